"""Temporal reuse (sigec.temporal): equal to the DeepCache package, key steps equal to the dense
model, the step-index and new-trajectory rules, streams, schedules, cache rules, torch.compile,
composition with spatial edits, and the errors where features do not compose."""
import copy
import types
import warnings

import pytest
import torch
import torch.nn as nn
from diffusers import DDIMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler

import sigec
from sigec.core.engine import EngineError
from sigec.models import ddpm_unet, sd_unet
from sigec.passes.specialize_cut import CutError
from sigec.runtime.cache import CacheBudgetError
from sigec.temporal import (FASTER_DIFFUSION_DDIM50, Auto, DeepCache, FasterDiffusion, KeySteps, Reuse,
                            TemporalCompositionError, Uniform, choose_key_steps, step_weights)

from benchmarks.temporal import ddim_loop
from sigec.frontends.measure import psnr

FULL, PARTIAL = "full", "partial"


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread runs them 30x faster than two OpenMP threads spin-waiting on
    a shared machine. Nothing tested here depends on the thread count."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def unet():
    """A UNet2DConditionModel with SD's block structure, small enough to capture in about a second."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
                                attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


@pytest.fixture(scope="module")
def text():
    return torch.randn(1, 77, 8, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def latent():
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def scheduler():
    return DDIMScheduler()


@pytest.fixture(scope="module")
def tiny(unet, latent, text):
    """``tiny(temporal, **options)``: ``sigec.compile`` of ``unet`` from one shared ``torch.export``
    of it (an ExportedProgram is compiled as it is, so each engine skips the capture, most of
    ``sigec.compile``'s time; the engine still reads the model's own weights)."""
    exported = torch.export.export(unet, (latent, torch.tensor(1)), {"encoder_hidden_states": text}, strict=False)

    def compile_(temporal, **options):
        return sigec.compile(exported, (latent, torch.tensor(1)), {"encoder_hidden_states": text},
                             temporal=temporal, **options)

    return compile_


@pytest.fixture(scope="module")
def dc3(tiny, scheduler):
    """DeepCache(3, 0), shared by the tests that reset it first."""
    return tiny(DeepCache(3, 0), scheduler=scheduler)


@pytest.fixture(scope="module")
def sd_tiny():
    """``sigec.models.sd_unet("sd-tiny")`` (SD 1.x block structure: 4 down and 4 up blocks, cross
    attention), its latent, text embedding, its export and its dense DDIM-20 result."""
    torch.set_num_threads(1)  # module fixtures run before the per-test thread setting
    g = torch.Generator().manual_seed(5)
    model, latent, text = sd_unet("sd-tiny"), torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
    exported = torch.export.export(model, (latent, torch.tensor(1)), {"encoder_hidden_states": text}, strict=False)
    dense = ddim(lambda x, t: model(x, t, encoder_hidden_states=text).sample, DDIMScheduler(), latent)
    return types.SimpleNamespace(model=model, latent=latent, text=text, exported=exported, dense=dense)


def ddim(step, scheduler, latent, steps=20):
    return ddim_loop(step, scheduler, latent, steps)


def kinds(engine):
    (history,) = engine.history().values()
    return [k for _, k in history]


# -- equal to DeepCache --------------------------------------------------------------------------


def _package_loop(model, call, latent, interval, branch, steps=20):
    helper_cls = pytest.importorskip("DeepCache").DeepCacheSDHelper
    scheduler = DDIMScheduler()
    helper = helper_cls(pipe=types.SimpleNamespace(unet=model, scheduler=scheduler))
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        return ddim(lambda x, t: call(model, x, t), scheduler, latent, steps)
    finally:
        helper.disable()


@pytest.mark.parametrize("interval, branch", [(3, 0), (5, 1), (2, 4)])
def test_equals_the_deepcache_package_on_sd_unet(sd_tiny, interval, branch):
    pytest.importorskip("DeepCache")
    text, latent = sd_tiny.text, sd_tiny.latent
    scheduler = DDIMScheduler()
    # (3, 0) compiles the model itself (the user's path); the others its export (same graph, faster)
    source = sd_tiny.model if (interval, branch) == (3, 0) else sd_tiny.exported
    engine = sigec.compile(source, (latent, torch.tensor(1)), {"encoder_hidden_states": text},
                           temporal=DeepCache(interval, branch), scheduler=scheduler)
    ours = ddim(lambda x, t: engine(x, t, encoder_hidden_states=text).sample, scheduler, latent)
    call = lambda m, x, t: m(x, t, encoder_hidden_states=text).sample  # noqa: E731
    theirs = _package_loop(sd_tiny.model, call, latent, interval, branch)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert (ours - sd_tiny.dense).abs().max() > 1e-3  # the reuse really changed the result
    assert kinds(engine).count(PARTIAL) == 20 - len(range(0, 20, interval))


def test_equals_the_deepcache_package_on_unet2dmodel():
    pytest.importorskip("DeepCache")
    model = ddpm_unet("demo", resolution=32)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    scheduler = DDIMScheduler()
    engine = sigec.compile(model, (x, torch.tensor(1)), temporal=DeepCache(3, 0), scheduler=scheduler)
    ours = ddim(lambda y, t: engine(y, t).sample, scheduler, x, steps=10)
    theirs = _package_loop(model, lambda m, y, t: m(y, t).sample, x, 3, 0, steps=10)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def _guided(eps_uncond, eps_cond):
    return eps_uncond + 7.5 * (eps_cond - eps_uncond)


def test_classifier_free_guidance_keeps_one_cache_per_half(dc3, unet, latent, text, scheduler):
    """A guidance batch keeps both halves in one cached tensor (one row each) and equals the DeepCache
    package; two calls per step (unconditional, conditional) are two streams with their own caches
    and give the same result."""
    pytest.importorskip("DeepCache")
    uncond = torch.zeros_like(text)
    texts = torch.cat([uncond, text])
    call = lambda m, x, t: _guided(*m(torch.cat([x, x]), t, encoder_hidden_states=texts).sample.chunk(2))  # noqa: E731
    batched = sigec.compile(unet, (torch.cat([latent, latent]), torch.tensor(1)), {"encoder_hidden_states": texts},
                            temporal=DeepCache(3, 0), scheduler=DDIMScheduler())
    ours = ddim(lambda x, t: call(batched, x, t), batched.scheduler, latent)
    torch.testing.assert_close(ours, _package_loop(unet, call, latent, 3, 0), rtol=0, atol=1e-4)
    (slot,) = [batched.store.get(k) for k in batched.store.keys()]
    assert slot.caches[0].shape[0] == 2

    dc3.reset()
    split = ddim(lambda x, t: _guided(dc3(x, t, encoder_hidden_states=uncond).sample,
                                      dc3(x, t, encoder_hidden_states=text).sample), scheduler, latent)
    assert len(dc3.store) == 2 and len(dc3.history()) == 2
    for history in dc3.history().values():
        assert [k for _, k in history] == [FULL if i % 3 == 0 else PARTIAL for i in range(20)]
    # the package keeps one cache per model, so two copies of the model, one per half, are its split run
    halves = [copy.deepcopy(unet), copy.deepcopy(unet)]
    helper_cls = pytest.importorskip("DeepCache").DeepCacheSDHelper
    reference_scheduler = DDIMScheduler()
    helpers = [helper_cls(pipe=types.SimpleNamespace(unet=m, scheduler=reference_scheduler)) for m in halves]
    for helper in helpers:
        helper.set_params(cache_interval=3, cache_branch_id=0)
        helper.enable()
    reference = ddim(lambda x, t: _guided(halves[0](x, t, encoder_hidden_states=uncond).sample,
                                          halves[1](x, t, encoder_hidden_states=text).sample),
                     reference_scheduler, latent)
    torch.testing.assert_close(split, reference, rtol=0, atol=1e-4)


# -- key steps and the dense model ---------------------------------------------------------------


def test_interval_1_is_the_uncached_loop_bit_for_bit(tiny, unet, latent, text):
    scheduler = DDIMScheduler()
    engine = tiny(DeepCache(1, 0), scheduler=scheduler)
    ours = ddim(lambda x, t: engine(x, t, encoder_hidden_states=text).sample, scheduler, latent)
    dense = ddim(lambda x, t: unet(x, t, encoder_hidden_states=text).sample, DDIMScheduler(), latent)
    assert torch.equal(ours, dense)
    assert set(kinds(engine)) == {FULL}


def test_every_key_step_equals_the_dense_step(dc3, unet, latent, text, scheduler):
    dc3.reset()
    checked = []

    def step(x, t):
        out = dc3(x, t, encoder_hidden_states=text).sample
        if dc3.last_kind == FULL:
            assert torch.equal(out, unet(x, t, encoder_hidden_states=text).sample)
            checked.append(int(t))
        return out

    ddim(step, scheduler, latent, steps=10)
    assert len(checked) == 4  # steps 0, 3, 6, 9


# -- step index and trajectories -----------------------------------------------------------------


def test_explicit_step_index_equals_the_scheduler_index(dc3, tiny, latent, text, scheduler):
    dc3.reset()
    by_scheduler = ddim(lambda x, t: dc3(x, t, encoder_hidden_states=text).sample, scheduler, latent, steps=8)
    engine = tiny(DeepCache(3, 0))
    other = DDIMScheduler()
    other.set_timesteps(8)
    x = latent.clone()
    with torch.no_grad():
        for i, t in enumerate(other.timesteps):
            x = other.step(engine.step(i)(x, t, encoder_hidden_states=text).sample, t, x).prev_sample
    assert torch.equal(x, by_scheduler)
    assert kinds(engine) == [FULL, PARTIAL, PARTIAL, FULL, PARTIAL, PARTIAL, FULL, PARTIAL]


@pytest.mark.parametrize("scheduler_cls", [EulerDiscreteScheduler, HeunDiscreteScheduler])
def test_scheduler_step_index_keeps_repeated_timesteps_apart(unet, latent, text, scheduler_cls):
    """Heun evaluates each timestep value twice; the index comes from the scheduler's step_index,
    so the schedule still counts model calls, never timestep values."""
    scheduler = scheduler_cls()
    engine = sigec.compile(unet, (latent, torch.tensor(1.0)), {"encoder_hidden_states": text},
                           temporal=DeepCache(3, 0), scheduler=scheduler)
    scheduler.set_timesteps(5)
    x = latent * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = engine(scheduler.scale_model_input(x, t), t, encoder_hidden_states=text).sample
            x = scheduler.step(eps, t, x).prev_sample
    (history,) = engine.history().values()
    calls = len(scheduler.timesteps)
    assert [s for s, _ in history] == list(range(calls))
    assert [k for _, k in history] == [FULL if s % 3 == 0 else PARTIAL for s in range(calls)]
    if scheduler_cls is HeunDiscreteScheduler:
        assert len(set(scheduler.timesteps.tolist())) < calls


def test_repeated_timestep_values_without_step_index_take_the_next_position(tiny, latent, text):
    timesteps = torch.tensor([900, 700, 700, 500, 300])
    engine = tiny(DeepCache(2, 0), scheduler=types.SimpleNamespace(timesteps=timesteps))
    with torch.no_grad():
        for t in timesteps:
            engine(latent, t, encoder_hidden_states=text)
    (history,) = engine.history().values()
    assert history == [(0, FULL), (1, PARTIAL), (2, FULL), (3, PARTIAL), (4, FULL)]


def test_new_trajectory_rule(dc3, latent, text, scheduler):
    """A new trajectory (timesteps set again, index not advancing, reset()) starts with a key step
    and drops what the previous one cached: the same input gives the same result bit for bit."""
    dc3.reset()
    call = lambda x, t: dc3(x, t, encoder_hidden_states=text).sample  # noqa: E731
    first = ddim(call, scheduler, latent, steps=7)
    other = ddim(call, scheduler, latent * 0.5, steps=7)  # set_timesteps again: new trajectory
    again = ddim(call, scheduler, latent, steps=7)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert kinds(dc3) == [FULL, PARTIAL, PARTIAL, FULL, PARTIAL, PARTIAL, FULL]
    t0, t1 = scheduler.timesteps[:2]
    with torch.no_grad():
        dc3(latent, t0, encoder_hidden_states=text)
        dc3(latent, t1, encoder_hidden_states=text)
        assert dc3.last_kind == PARTIAL
        dc3(latent, t1, encoder_hidden_states=text)  # the index did not advance
        assert dc3.last_kind == FULL and kinds(dc3) == [FULL]
        dc3(latent, scheduler.timesteps[2], encoder_hidden_states=text)
        assert dc3.last_kind == PARTIAL
        dc3.reset()
        dc3(latent, scheduler.timesteps[3], encoder_hidden_states=text)
        assert dc3.last_kind == FULL and len(dc3.store) == 1


def test_img2img_trajectory_counts_from_its_first_step(dc3, latent, text, scheduler):
    dc3.reset()
    scheduler.set_timesteps(10)
    with torch.no_grad():
        for t in scheduler.timesteps[4:]:  # strength 0.6: the trajectory starts at step 4
            dc3(latent, t, encoder_hidden_states=text)
    (history,) = dc3.history().values()
    assert history == [(0, FULL), (1, PARTIAL), (2, PARTIAL), (3, FULL), (4, PARTIAL), (5, PARTIAL)]


# -- schedules -----------------------------------------------------------------------------------


def test_faster_diffusion_key_steps_and_dependence(tiny, latent, text):
    scheduler = DDIMScheduler()
    engine = tiny(FasterDiffusion(), scheduler=scheduler)
    assert engine.key_steps(50) == frozenset(FASTER_DIFFUSION_DDIM50)
    assert engine.key_steps(20) == frozenset({0, 1, 2, 4, 6, 10, 14})
    spec = engine.specialization
    assert spec.reads == ("timestep", "encoder_hidden_states")  # the decoder never reads the latent
    assert len(spec.cut) == 5  # conv_in, a skip and a down-sampling of block 0, the skip of block 1, mid block
    assert engine.macs()[PARTIAL] < engine.macs()[FULL]
    sequential = ddim(lambda x, t: engine(x, t, encoder_hidden_states=text).sample, scheduler, latent)
    batched = tiny(FasterDiffusion(batch_partial_steps=True), scheduler=DDIMScheduler())
    calls = []
    result = ddim(lambda x, t: (calls.append(1), batched(x, t, encoder_hidden_states=text).sample)[1],
                  batched.scheduler, latent)
    torch.testing.assert_close(result, sequential, rtol=1e-4, atol=1e-4)
    assert kinds(batched) == kinds(engine) and len(calls) == 20


def test_reuse_by_module_names_equals_deepcache(dc3, tiny, latent, text, scheduler):
    modules = dc3.cut_modules()
    assert modules == ["up_blocks.1.attentions.0"]
    engine = tiny(Reuse(modules, schedule=3), scheduler=DDIMScheduler())
    assert engine.specialization.cut == dc3.specialization.cut
    dc3.reset()
    a = ddim(lambda x, t: dc3(x, t, encoder_hidden_states=text).sample, scheduler, latent, steps=9)
    b = ddim(lambda x, t: engine(x, t, encoder_hidden_states=text).sample, engine.scheduler, latent, steps=9)
    assert torch.equal(a, b)
    keyed = tiny(Reuse(["up_blocks.1.attentions.*"], schedule=[0, 1, 5]), scheduler=DDIMScheduler())
    ddim(lambda x, t: keyed(x, t, encoder_hidden_states=text).sample, keyed.scheduler, latent, steps=9)
    assert kinds(keyed) == [FULL, FULL, PARTIAL, PARTIAL, PARTIAL, FULL, PARTIAL, PARTIAL, PARTIAL]
    assert len(keyed.specialization.cut) == 1  # attentions.1 computes the output itself: only attentions.0 is cut


def test_auto_schedule_calibrates_on_the_first_trajectory(tiny, unet, latent, text):
    scheduler = DDIMScheduler()
    engine = tiny(Reuse("up_blocks.1.attentions.0", schedule="auto"), scheduler=scheduler)
    call = lambda x, t: engine(x, t, encoder_hidden_states=text).sample  # noqa: E731
    with pytest.raises(EngineError, match="not measured"):
        engine.key_steps(12)
    calibration = ddim(call, scheduler, latent, steps=12)
    dense = ddim(lambda x, t: unet(x, t, encoder_hidden_states=text).sample, DDIMScheduler(), latent, steps=12)
    assert torch.equal(calibration, dense) and set(kinds(engine)) == {FULL}
    keys = engine.key_steps(12)
    assert 0 in keys and len(keys) == len(Uniform(3).key_steps(12))  # the MACs of uniform N=3
    ddim(call, scheduler, latent, steps=12)
    assert [i for i, k in enumerate(kinds(engine)) if k == FULL] == sorted(keys)
    assert engine.loop_macs(12) == len(keys) * engine.macs()[FULL] + (12 - len(keys)) * engine.macs()[PARTIAL]


def test_choose_key_steps_is_optimal_within_the_window_and_follows_the_weights():
    import itertools

    n, window = 10, 4
    rate = [0.0, 0.9, 0.8, 0.1, 0.1, 0.05, 0.05, 0.6, 0.1, 0.1]
    # the error of reusing key step k at step j grows with the change in between; pairs further
    # apart than the window were not measured
    error = {(k, j): sum(rate[k + 1:j + 1]) for k in range(n) for j in range(k + 1, min(n, k + window + 1))}

    def cost(keys, weights):  # per key step, its partial steps' weighted errors summed, then squared
        keys = sorted(keys)
        return sum(sum(weights[j] * error.get((k, j), float("inf")) for j in range(k + 1, end)) ** 2
                   for k, end in zip(keys, keys[1:] + [n]))

    for weights in ([1.0] * n, [3.0, 3.0, 2.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.2, 0.1]):
        for budget in (2, 3, 4):
            chosen = choose_key_steps(error, n, budget, weights)
            best = min(cost({0, *c}, weights) for c in itertools.combinations(range(1, n), budget - 1))
            assert len(chosen) == budget and 0 in chosen and cost(chosen, weights) == pytest.approx(best)
    heavy = [1.0] * n
    heavy[5] = 1000.0  # an error at step 5 would cost the most: it becomes a key step
    assert 5 in choose_key_steps(error, n, 3, heavy) and 5 not in choose_key_steps(error, n, 3)
    assert choose_key_steps(error, n, 20) == frozenset(range(n))
    with pytest.raises(EngineError, match="window"):
        choose_key_steps(error, n, 1)  # one key step cannot serve 9 steps with a window of 4


def test_step_weights_follow_the_ddim_update():
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    weights = step_weights(scheduler, scheduler.timesteps.tolist())
    # DDIM: x' = sqrt(a'/a) (x - sqrt(1-a) e) + sqrt(1-a') e, so an error in e moves x' by this factor
    abar = [float(scheduler.alphas_cumprod[t]) for t in scheduler.timesteps] + [1.0]
    for j, w in enumerate(weights):
        a, a_next = abar[j], abar[j + 1]
        expected = abs((a_next / a) ** 0.5 * (1 - a) ** 0.5 - (1 - a_next) ** 0.5)
        assert w == pytest.approx(expected, rel=1e-9)
    assert weights[0] > weights[5] > weights[-1]  # errors at noisy steps move the latent most
    assert step_weights(types.SimpleNamespace(), [3, 2, 1]) == [1.0, 1.0, 1.0]


def test_auto_schedule_beats_uniform_at_equal_macs_on_the_trained_model():
    """At the MACs of uniform N=3, 'auto' (calibrated on other noise) brings the final samples of the
    trained digits DDPM closer to the uncached loop's than uniform N=3 does."""
    model, config = sigec.models.load("digits-ddpm")
    size, steps = model.config.sample_size, 10
    noise = torch.randn(8, model.config.in_channels, size, size, generator=torch.Generator().manual_seed(1))
    calibration = torch.randn(noise.shape, generator=torch.Generator().manual_seed(2))
    scheduler = DDIMScheduler.from_config(config)
    dense = ddim(lambda x, t: model(x, t).sample, scheduler, noise, steps)
    exported = torch.export.export(model, (noise, torch.tensor(999)), strict=False)
    uniform = sigec.compile(exported, (noise, torch.tensor(999)), temporal=DeepCache(3, 0), scheduler=scheduler)
    auto = sigec.compile(exported, (noise, torch.tensor(999)), temporal=Reuse(uniform.cut_modules(), "auto"),
                         scheduler=scheduler)
    ddim(lambda x, t: auto(x, t).sample, scheduler, calibration, steps)
    assert auto.loop_macs(steps) == uniform.loop_macs(steps) and auto.key_steps(steps) != uniform.key_steps(steps)
    auto_psnr = psnr(ddim(lambda x, t: auto(x, t).sample, scheduler, noise, steps), dense)
    uniform_psnr = psnr(ddim(lambda x, t: uniform(x, t).sample, scheduler, noise, steps), dense)
    assert auto_psnr > uniform_psnr + 1.0, (auto_psnr, uniform_psnr)


def test_schedule_specs_validate():
    assert Uniform(4).key_steps(10) == frozenset({0, 4, 8})
    assert KeySteps((0, 25), reference_steps=50).key_steps(10) == frozenset({0, 5})
    assert Auto(5).budget(20) == 4
    for bad in (lambda: DeepCache(0, 0), lambda: DeepCache(3, -1), lambda: KeySteps((1, 2)),
                lambda: Reuse([], 3), lambda: Reuse("conv_in", "sometimes"), lambda: FasterDiffusion(key_steps=(2, 3))):
        with pytest.raises(ValueError):
            bad()


# -- cache rules ---------------------------------------------------------------------------------


def test_cut_values_live_in_the_slot_store_with_budget_dtype_and_staleness(tiny, unet, latent, text):
    scheduler = DDIMScheduler()
    engine = tiny(DeepCache(3, 0), scheduler=scheduler, cache_dtype=torch.bfloat16)
    reference = tiny(DeepCache(3, 0), scheduler=DDIMScheduler())
    narrow = ddim(lambda x, t: engine(x, t, encoder_hidden_states=text).sample, scheduler, latent, steps=6)
    wide = ddim(lambda x, t: reference(x, t, encoder_hidden_states=text).sample, reference.scheduler, latent, steps=6)
    (slot,) = [engine.store.get(k) for k in engine.store.keys()]
    assert slot.caches[0].dtype == torch.bfloat16 and narrow.dtype == torch.float32
    assert 0 < (narrow - wide).abs().max() < 0.05 * wide.abs().max()
    # weights changed in place: the next partial step runs in full instead (on_stale="rerecord")
    scheduler.set_timesteps(6)
    ts = scheduler.timesteps
    with torch.no_grad():
        engine(latent, ts[0], encoder_hidden_states=text)
        weight = unet.conv_out.bias
        weight.add_(0.0)  # a new version, same values
        engine(latent, ts[1], encoder_hidden_states=text)
        assert engine.last_kind == FULL
        engine(latent, ts[2], encoder_hidden_states=text)
        assert engine.last_kind == PARTIAL


def test_stale_cut_values_raise_when_asked(tiny, unet, latent, text):
    scheduler = DDIMScheduler()
    engine = tiny(DeepCache(3, 0), scheduler=scheduler, on_stale="raise")
    scheduler.set_timesteps(6)
    with torch.no_grad():
        engine(latent, scheduler.timesteps[0], encoder_hidden_states=text)
        unet.conv_out.bias.add_(0.0)
        with pytest.raises(EngineError, match="weights changed"):
            engine(latent, scheduler.timesteps[1], encoder_hidden_states=text)


def test_a_replaced_parameter_is_refused(unet, latent, text):
    model = copy.deepcopy(unet)
    engine = sigec.compile(model, (latent, torch.tensor(1)), {"encoder_hidden_states": text},
                           temporal=DeepCache(3, 0), scheduler=DDIMScheduler())
    assert all(m is not model for m in engine.modules())  # the engine does not own the user's model
    model.conv_out.weight = nn.Parameter(model.conv_out.weight.detach().clone())
    with pytest.raises(EngineError, match="replaced"):
        engine.step(0)(latent, torch.tensor(1), encoder_hidden_states=text)


def test_an_evicted_cut_runs_the_step_in_full_and_raise_refuses(tiny, latent, text):
    one_slot = 8 * 8 * 8 * 4  # the cut value of one stream: 8 channels, 8x8, fp32
    scheduler = DDIMScheduler()
    engine = tiny(DeepCache(3, 0), scheduler=scheduler, cache_budget_bytes=one_slot)
    other = torch.zeros_like(text)
    scheduler.set_timesteps(6)
    ts = scheduler.timesteps
    with torch.no_grad():
        engine(latent, ts[0], encoder_hidden_states=text)
        engine(latent, ts[0], encoder_hidden_states=other)  # a second stream evicts the first
        engine(latent, ts[1], encoder_hidden_states=text)
        assert engine.last_kind == FULL  # its cut was evicted: computed, never guessed
    strict = tiny(DeepCache(3, 0), scheduler=scheduler, cache_budget_bytes=one_slot,
                           on_cache_full="raise")
    with torch.no_grad():
        strict(latent, ts[0], encoder_hidden_states=text)
        with pytest.raises(CacheBudgetError):
            strict(latent, ts[0], encoder_hidden_states=other)


# -- errors --------------------------------------------------------------------------------------


def test_errors_are_specific(dc3, tiny, latent, text):
    dc3.reset()
    with pytest.raises(EngineError, match="edits=True"):
        dc3(latent, torch.tensor(1), encoder_hidden_states=text, mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(EngineError, match="not in scheduler.timesteps"):
        dc3(latent, torch.tensor(12345), encoder_hidden_states=text)
    with pytest.raises(EngineError, match="shape"):
        dc3(latent[..., :4], torch.tensor(1), encoder_hidden_states=text)
    with pytest.raises(EngineError, match="structure"):
        dc3(latent, torch.tensor(1))  # the text embedding is missing
    with pytest.raises(EngineError, match="must be a tensor"):
        dc3(latent, 1, encoder_hidden_states=text)
    with pytest.raises(EngineError, match="cannot move"):
        dc3.to(torch.float16)
    bare = tiny(DeepCache(3, 0))
    with pytest.raises(EngineError, match="engine.step"):
        bare(latent, torch.tensor(1), encoder_hidden_states=text)
    with pytest.raises(CutError, match="out of range"):
        tiny(DeepCache(3, 6))
    with pytest.raises(CutError, match="close names"):
        tiny(Reuse("up_block.1.attentions.0"))
    with pytest.raises(CutError, match="diffusers UNet"):
        sigec.compile(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1)).eval(), (latent,), temporal=DeepCache(3, 0))
    with pytest.raises(TypeError, match="temporal="):
        tiny("deepcache")


def test_features_that_do_not_compose_say_so(tiny):
    with pytest.raises(TemporalCompositionError, match="does not read the latent"):
        tiny(DeepCache(3, 0, batch_partial_steps=True), scheduler=DDIMScheduler())
    with pytest.raises(TemporalCompositionError, match="one resolution"):
        tiny(FasterDiffusion(edits=True), scheduler=DDIMScheduler())
    with pytest.raises(TemporalCompositionError, match="scheduler"):
        tiny(FasterDiffusion(batch_partial_steps=True))


# -- torch.compile -------------------------------------------------------------------------------


def test_runs_under_torch_compile_as_one_graph(dc3, unet, latent, text, scheduler):
    dc3.reset()
    expected = ddim(lambda x, t: dc3(x, t, encoder_hidden_states=text).sample, scheduler, latent, steps=7)
    torch._dynamo.reset()
    compiled_graphs = []
    options = {"temporal": DeepCache(3, 0), "scheduler": DDIMScheduler()}

    def backend(gm, example_inputs):
        compiled_graphs.append(gm)
        return sigec.backend(**options)(gm, example_inputs)

    step = torch.compile(unet, backend=backend)
    counters = torch._dynamo.utils.counters
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the sigec backend warns when it falls back to the plain graph
        got = ddim(lambda x, t: step(x, t, encoder_hidden_states=text).sample, options["scheduler"], latent, steps=7)
    assert torch.equal(got, expected) and len(compiled_graphs) == 1
    assert not counters["graph_break"], dict(counters["graph_break"])  # 0 graph breaks
    torch._dynamo.reset()


# -- composition with spatial edits --------------------------------------------------------------


class TinyUNet(nn.Module):
    """A UNet of local operators (no normalization, no attention), so that the spatial ``exact``
    policy reproduces the dense model and the composition can be checked exactly."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(2, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.upsample = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.up = nn.Conv2d(16, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x, timestep):
        skip = torch.relu(self.conv_in(x))
        deep = self.upsample(torch.relu(self.mid(torch.relu(self.down(skip)))))
        return self.conv_out(torch.relu(self.up(torch.cat([deep * (1 + timestep / 1000), skip], dim=1))))


def test_edited_trajectory_runs_partial_steps_sparse_and_equals_dense_under_exact():
    """Reuse the deep feature (DeepCache's pattern): the partial graph reads the latent (for the skip)
    and the cut value, both at full resolution, so partial steps of an edited trajectory run sparse."""
    torch.manual_seed(0)
    model = TinyUNet().eval()
    x = torch.randn(1, 2, 48, 48, generator=torch.Generator().manual_seed(0))
    x_edit = x.clone()
    x_edit[..., 4:9, 30:36] += 1.0
    scheduler = DDIMScheduler()
    engine = sigec.compile(model, (x, torch.tensor(1)), temporal=Reuse("upsample", 2, edits=True),
                           scheduler=scheduler, policy="exact", block_size=4)
    dense = sigec.compile(model, (x, torch.tensor(1)), temporal=Reuse("upsample", 2), scheduler=DDIMScheduler())
    assert dense.specialization.reads == ("x", "timestep")
    recorded = ddim(engine, scheduler, x, steps=4)
    assert torch.equal(recorded, ddim(dense, dense.scheduler, x, steps=4))
    assert torch.equal(ddim(engine, scheduler, x, steps=4), recorded)  # unedited: bit for bit
    work = []

    def step(y, t):
        out = engine(y, t)
        report = engine.spatial_engines[engine.last_kind].report()
        work.append((engine.last_kind, report.incremental_macs / report.dense_macs))
        return out

    edited = ddim(step, scheduler, x_edit, steps=4)
    torch.testing.assert_close(edited, ddim(dense, dense.scheduler, x_edit, steps=4), rtol=1e-4, atol=1e-4)
    assert [k for k, _ in work] == [FULL, PARTIAL, FULL, PARTIAL]
    assert all(0 < fraction < 0.8 for _, fraction in work), work  # every step, partial ones too, ran sparse


def test_sdedit_on_the_sd_unet_partial_steps_run_sparse(tiny, latent, text):
    scheduler = DDIMScheduler()
    engine = tiny(DeepCache(3, 0, edits=True), scheduler=scheduler, block_size=2)
    call = lambda x, t, **kw: engine(x, t, encoder_hidden_states=text, **kw).sample  # noqa: E731
    recorded = ddim(call, scheduler, latent, steps=6)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[0:2, 0:2] = True
    work = []

    def step(x, t):
        out = call(x, t, mask=mask)
        report = engine.spatial_engines[engine.last_kind].report()
        work.append((engine.last_kind, report.incremental_macs / report.dense_macs))
        return out

    edited = ddim(step, scheduler, torch.where(mask, latent + 0.5, latent), steps=6)
    assert [k for k, _ in work] == [FULL, PARTIAL, PARTIAL, FULL, PARTIAL, PARTIAL]
    assert all(fraction < 0.9 for _, fraction in work), work
    assert not torch.equal(edited, recorded)
    # far from the edit's blocks every step returned recorded values, so the trajectory is unchanged there
    assert torch.equal(edited[..., 5:, :], recorded[..., 5:, :])


def test_benchmark_quick_mode(tmp_path):
    from benchmarks import temporal as bench

    out = tmp_path / "temporal.json"
    result = bench.main(["--quick", "--no-timing", "--threads", "1", "--fidelity-steps", "", "--json", str(out)])
    (model,) = result["models"]
    rows = {r["variant"]: r for r in model["rows"]}
    assert rows["dense"]["mac_ratio"] == 1.0
    assert 1.0 < rows["sigec FasterDiffusion"]["mac_ratio"] < rows["sigec DeepCache N=3"]["mac_ratio"]
    for check in model["flop_counter_check"].values():  # the graphs' MACs agree with FlopCounterMode
        assert check["ratio"] == pytest.approx(1.0, abs=1e-6)
    if result["deepcache_package"]:
        assert rows["DeepCache package N=3"]["max_abs_diff_vs_sigec"] < 1e-4
    assert out.exists()
