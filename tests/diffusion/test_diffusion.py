"""sigec.diffusion: SDEdit and inpainting loops, cache budget / dtype / host offload, no stale slots.

Models: the reduced Stable Diffusion configurations (``sd_unet("sd-tiny")``: SD 1.x's block
structure with cross-attention, 16x16 latent; ``sd_vae("sd-tiny")``: SD's four-level 8x VAE with
few channels), seeded random weights. References are loops written here directly on diffusers
(``DDIMScheduler``, the UNet and the VAE), independent of ``sigec.diffusion``.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

import sigec  # noqa: E402
from sigec.diffusion import (SD_SCHEDULER_CONFIG, DiffusionEditor, SlotEvictedError, latent_mask,  # noqa: E402
                             sd_vae)
from sigec.frontends.edits import ellipse_mask  # noqa: E402
from sigec.core.engine import EngineError  # noqa: E402
from sigec.frontends.measure import psnr  # noqa: E402
from sigec.models import sd_unet  # noqa: E402
from sigec.runtime.cache import CacheBudgetError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SIZE = 128  # image side: a 16x16 latent through the 8x VAE


@pytest.fixture(autouse=True)
def _one_thread():
    """Many small dense calls: with two OpenMP threads busy-waiting on a shared machine (CI does not
    set OMP_WAIT_POLICY=PASSIVE) this file ran 5x slower under load; one thread does not spin."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def unet():
    return sd_unet("sd-tiny")


@pytest.fixture(scope="module")
def vae():
    return sd_vae("sd-tiny")


@pytest.fixture(scope="module")
def embeddings():
    g = torch.Generator().manual_seed(7)
    return torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)


@pytest.fixture(scope="module")
def picture():
    """A smooth image in [-1, 1], an edit that repaints an ellipse, and its mask."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    image = torch.stack([xs * 0.8, ys * 0.6, (xs * ys) * 0.9])[None]
    mask = ellipse_mask(SIZE, SIZE, 0.05)
    edited = torch.where(mask, torch.tensor([0.9, -0.7, 0.2]).view(1, 3, 1, 1), image)
    return image, edited, mask


def reference_scheduler(steps: int):
    from diffusers import DDIMScheduler
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(steps)
    return scheduler


def reference_loop(unet, vae, image, cond, uncond, guidance, steps, strength, seed, task="sdedit", known=None,
                   mask=None):
    """Dense SDEdit / blended-latent inpainting written directly on diffusers (the oracle)."""
    sched = reference_scheduler(steps)
    timesteps = sched.timesteps[steps - int(steps * strength):]
    with torch.no_grad():
        encode = (lambda im: vae.encode(im).latent_dist.mean * vae.config.scaling_factor) if vae else (lambda im: im)
        z = encode(image)
        z_known = encode(known) if known is not None else z
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))
        x = sched.add_noise(z, noise, timesteps[:1])
        if task == "inpaint":
            x = torch.where(mask, x, sched.add_noise(z_known, noise, timesteps[:1]))
        for i, t in enumerate(timesteps):
            if uncond is None:
                eps = unet(x, t, encoder_hidden_states=cond).sample
            else:
                e_u, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
                eps = e_u + guidance * (e_c - e_u)
            x = sched.step(eps, t, x).prev_sample
            if task == "inpaint":
                nxt = sched.add_noise(z_known, noise, timesteps[i + 1:i + 2]) if i + 1 < len(timesteps) else z_known
                x = torch.where(mask, x, nxt)
        return (vae.decode(x / vae.config.scaling_factor).sample if vae else x), x


def assert_close(a, b, rtol=1e-4):
    scale = float(b.abs().max())
    assert float((a - b).abs().max()) <= rtol * max(scale, 1.0), float((a - b).abs().max())


# -- the loops ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sdedit_run(unet, vae, embeddings, picture):
    cond, uncond = embeddings
    image, edited, mask = picture
    editor = DiffusionEditor(unet, cond, vae=vae, uncond_embeddings=uncond, guidance_scale=5.0, steps=10, strength=0.5,
                             seed=3, progress=False)
    original = editor.record(image)
    return editor, original, editor.edit(edited, mask, dense=True)


def test_sdedit_with_vae_and_guidance_matches_reference_loops(unet, vae, embeddings, picture, sdedit_run):
    cond, uncond = embeddings
    image, edited, mask = picture
    editor, original, result = sdedit_run
    ref_original, ref_original_latents = reference_loop(unet, vae, image, cond, uncond, 5.0, 10, 0.5, 3)
    ref_edited, _ = reference_loop(unet, vae, edited, cond, uncond, 5.0, 10, 0.5, 3)
    # the recording is the dense original trajectory; dense=True is the dense edited one
    assert_close(original, ref_original)
    assert_close(result.original_latents, ref_original_latents)
    assert_close(result.dense_image, ref_edited)
    assert result.steps == [5, 6, 7, 8, 9]
    assert set(editor.engines["unet"].store.keys()) == {("named", s) for s in result.steps}
    # the edit is recomputed near the mask only: elsewhere the latents are the original's, bit for
    # bit (block rounding and the receptive field reach a few latent pixels past the mask)
    lmask = latent_mask(mask, (16, 16))
    near = F.max_pool2d(lmask[None, None].float(), 9, stride=1, padding=4)[0, 0] > 0
    changed = (result.latents != result.original_latents).any(dim=1)[0]
    assert changed[lmask].all() and not (changed & ~near).any()
    assert float((result.image != result.original_image).any(dim=1).float().mean()) < 0.5
    assert result.record_s > 0 and result.edited_s > 0 and result.dense_edited_s > 0
    assert set(result.slot_bytes) == {"unet", "vae_encoder", "vae_decoder"} and min(result.slot_bytes.values()) > 0
    # an empty edit returns the recorded result bit for bit, through every engine
    same = editor.edit(image, torch.zeros(SIZE, SIZE, dtype=torch.bool))
    assert torch.equal(same.image, original) and torch.equal(same.latents, result.original_latents)


def test_inpaint_keeps_the_known_region_and_matches_reference(unet, embeddings):
    """Latent-space inpainting (no VAE): outside the mask the result is the original, exactly."""
    cond, _ = embeddings
    z0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    mask = ellipse_mask(16, 16, 0.1)
    editor = DiffusionEditor(unet, cond, task="inpaint", steps=8, seed=5, progress=False)
    assert editor.strength == 1.0 and len(editor.steps) == 8
    assert torch.equal(editor.record(z0), z0)  # the recorded trajectory: the original noised at every step
    result = editor.edit(mask=mask, dense=True)
    _, ref = reference_loop(unet, None, z0, cond, None, 1.0, 8, 1.0, 5, task="inpaint", known=z0, mask=mask)
    assert_close(result.dense_latents, ref)
    for out in (result.latents, result.dense_latents):
        assert torch.equal(torch.where(mask, 0.0, out), torch.where(mask, 0.0, z0))
        assert not torch.equal(out, z0)  # the masked region was regenerated
    assert torch.isfinite(result.latents).all()


def test_latent_mask_max_pools_image_cells():
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[9, 3] = True
    lm = latent_mask(mask, (2, 2))
    assert lm.tolist() == [[False, False], [True, False]]
    with pytest.raises(ValueError, match="down-sample evenly"):
        latent_mask(torch.zeros(15, 16, dtype=torch.bool), (2, 2))


# -- cache budget, dtype, eviction, stale slots ------------------------------------------------
FIFTY = dict(task="sdedit", steps=50, strength=1.0, seed=2, progress=False)


@pytest.fixture(scope="module")
def latent_edit():
    z0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    mask = ellipse_mask(16, 16, 0.05)
    return z0, torch.where(mask, -z0, z0), mask


@pytest.fixture(scope="module")
def unbounded(unet, embeddings, latent_edit):
    """50 steps recorded with an fp16 cache and no budget, and its edit: the reference for the budgets."""
    z0, edited, mask = latent_edit
    editor = DiffusionEditor(unet, embeddings[0], cache_dtype=torch.float16, **FIFTY)
    editor.record(z0)
    return editor, editor.edit(edited, mask)


def _track_peak(store) -> list:
    """Record the store's bytes after every put."""
    peak = [0]
    put = store.put

    def tracked(key, slot):
        put(key, slot)
        peak[0] = max(peak[0], store.nbytes())
    store.put = tracked
    return peak


def test_fp16_cache_of_50_steps_stores_the_fp32_activations_narrowed(unet, embeddings, unbounded):
    editor, result = unbounded
    store = editor.engines["unet"].store
    assert len(store) == 50 and len(result.steps) == 50
    assert store.nbytes() <= 50 * result.slot_bytes["unet"]
    # step 0 recorded again by an fp32-cache engine: the fp16 slot holds the same tensors, the
    # activations narrowed to fp16 and the rest (slot constants, inputs, outputs) as they were
    x0, t0 = editor._original["states"][0], editor.scheduler.timesteps[0].reshape(1)
    engine32 = sigec.compile(unet, (x0, t0), {"encoder_hidden_states": embeddings[0]})
    with engine32.slot(0):
        engine32(x0, t0, encoder_hidden_states=embeddings[0])
    slot32, slot16 = engine32.store.get(("named", 0)), store.get(("named", 0))
    # the edit wrote its blocks into the fp16 working buffers; put back the recorded ones (what
    # the engine does before its next call)
    editor.engines["unet"]._restore(slot16)
    narrowed = 0
    for a32, a16 in zip(slot32.tensors(), slot16.tensors(), strict=True):
        if a16.dtype == torch.float16 and a32.dtype == torch.float32:
            assert torch.equal(a16, a32.half())
            narrowed += a16.numel()
        else:
            assert torch.equal(a16, a32)
    assert narrowed > 0 and slot16.nbytes() == slot32.nbytes() - 2 * narrowed
    assert slot16.nbytes() < 0.75 * slot32.nbytes()


@pytest.fixture(scope="module")
def budgeted(unet, embeddings, latent_edit, unbounded):
    """The same 50 steps under a budget for 20 slots (evict), the bytes after every put tracked."""
    z0, _, _ = latent_edit
    slot = unbounded[1].slot_bytes["unet"]
    budget = 20 * slot + slot // 2
    editor = DiffusionEditor(unet, embeddings[0], cache_dtype=torch.float16, cache_budget_bytes=budget, **FIFTY)
    editor._compile_engines(z0)
    peak = _track_peak(editor.engines["unet"].store)
    original = editor.record(z0)
    return editor, original, budget, peak


def test_budget_holds_the_most_recent_slots_within_it(budgeted, unbounded):
    editor, original, budget, peak = budgeted
    store = editor.engines["unet"].store
    assert torch.equal(original, unbounded[1].original_latents)
    assert 0 < peak[0] <= budget and store.nbytes() <= budget
    assert sorted(k[1] for k in store.keys()) == list(range(30, 50))  # least recently used out: steps 0-29


# in this order: "raise" and "dense" leave the held slots as they are, "rerecord" changes them
@pytest.mark.parametrize("rule", ["raise", "dense", "rerecord"])
def test_no_evicted_step_is_served_another_slot(budgeted, unbounded, latent_edit, rule):
    z0, edited, mask = latent_edit
    editor, _, budget, peak = budgeted
    ref_editor, ref = unbounded
    store = editor.engines["unet"].store
    editor.on_missing_slot = rule
    if rule == "raise":
        with pytest.raises(SlotEvictedError, match="step 0 was evicted"):
            editor.edit(edited, mask)
        return
    result = editor.edit(edited, mask)
    assert peak[0] <= budget and store.nbytes() <= budget
    if rule == "rerecord":
        # the evicted steps recorded again from the original trajectory: the unbounded result, exactly
        # (step 0's re-recording evicts step 30's slot; each re-recorded slot is dropped after use)
        assert result.rerecorded_steps == list(range(31)) and not result.dense_fallback_steps
        assert sorted(k[1] for k in store.keys()) == list(range(31, 50))
        assert torch.equal(result.latents, ref.latents)
    else:
        # the evicted steps ran on the plain UNet: that is the reference edit with those steps dense
        assert result.dense_fallback_steps == list(range(30)) and not result.rerecorded_steps
        expected = _edit_with_dense_steps(ref_editor, edited, mask, set(range(30)))
        assert torch.equal(result.latents, expected)
        assert not torch.equal(result.latents, ref.latents)


def _edit_with_dense_steps(editor: DiffusionEditor, edited, mask, dense_steps: set) -> torch.Tensor:
    """The unbounded editor's edit with ``dense_steps`` run on the plain UNet (via its public pieces)."""
    lmask = latent_mask(mask, tuple(edited.shape[-2:]))
    incremental = editor._engine_denoise(lmask, {"dense": [], "rerecord": []})

    def denoise(step, x, t):
        return editor._dense_denoise(step, x, t) if step in dense_steps else incremental(step, x, t)
    start = torch.where(lmask, edited, editor._original["image"])
    return editor._trajectory(denoise, start, editor._original["latents"], lmask, "check")


def test_a_wrong_slot_is_refused_or_would_be_caught(unet, embeddings, latent_edit, unbounded):
    """Serving step 1 the slot of step 2 is refused (its timestep differs). Forging the guard too
    changes the result, so the exact comparisons above would catch a wrong slot."""
    z0, edited, mask = latent_edit
    editor, ref = unbounded
    slots = editor.engines["unet"].store._slots
    a, b = ("named", 1), ("named", 2)
    fingerprints = slots[a].nonspatial_fingerprint, slots[b].nonspatial_fingerprint
    slots[a], slots[b] = slots[b], slots[a]
    try:
        with pytest.raises(EngineError, match="different non-spatial inputs"):
            editor.edit(edited, mask)
        slots[a].nonspatial_fingerprint, slots[b].nonspatial_fingerprint = fingerprints
        forged = editor.edit(edited, mask)
        assert not torch.allclose(forged.latents, ref.latents, atol=1e-3)
    finally:  # put the module's reference editor back as it was
        slots[a], slots[b] = slots[b], slots[a]
        slots[a].nonspatial_fingerprint, slots[b].nonspatial_fingerprint = fingerprints


def test_budget_rule_raise_fails_before_recording_the_rest(budgeted, latent_edit):
    z0, _, _ = latent_edit
    editor, _, budget, _ = budgeted
    editor.on_cache_full = editor.engines["unet"].store.on_full = "raise"  # (this test comes last: it clears)
    with pytest.raises(CacheBudgetError, match="recording 50 steps needs about"):
        editor.record(z0)
    assert len(editor.engines["unet"].store) == 0


# -- host offload --------------------------------------------------------------------------------
def test_offload_keeps_slots_on_the_host_and_gives_the_same_results(unet, embeddings, latent_edit):
    cond, uncond = embeddings
    image, edited, mask = latent_edit
    runs = {}
    for offload in (None, "cpu"):
        editor = DiffusionEditor(unet, cond, uncond_embeddings=uncond, steps=10, strength=0.3, seed=1,
                                 offload=offload, progress=False)
        seen = []
        editor._compile_engines(image)
        store = editor.engines["unet"].store
        checkout = store.checkout

        def watched(key, device, checkout=checkout, seen=seen):
            slot = checkout(key, device)
            seen.append(None if slot is None else slot.location)  # where the slot is during the call
            return slot
        store.checkout = watched
        editor.record(image)
        runs[offload] = (editor, editor.edit(edited, mask), seen)
    (plain, r_plain, seen_plain), (off, r_off, seen_off) = runs[None], runs["cpu"]
    assert torch.equal(r_off.latents, r_plain.latents) and not torch.equal(r_off.latents, r_off.original_latents)
    assert seen_off == [None] * 3 + ["device"] * 3  # recorded (no slot yet), then used on the compute device
    assert seen_plain == seen_off
    for name, engine in off.engines.items():
        assert engine.store.offload == "cpu" and engine.store.bytes_fetched > 0
        assert all(s.location == "host" for s in engine.store._slots.values()), name
        assert all(s.location == "device" for s in plain.engines[name].store._slots.values())


def test_offloaded_slots_carry_in_place_edits_and_commits(unet):
    """Engine level: after every call the host copy of an offloaded slot equals the slot of an engine
    without offload (in-place writes, saved blocks and commits all come back to the host)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
                              torch.nn.GroupNorm(4, 8), torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 3, padding=1)).eval()
    x = torch.randn(1, 3, 32, 32)
    engines = [sigec.compile(net, (x,)) for _ in range(2)]
    engines[1].store.offload = "cpu"
    with torch.no_grad():
        outs = [[e(x)] for e in engines]
        for k in range(4):
            m = torch.zeros(32, 32, dtype=torch.bool)
            m[6 * k:6 * k + 7, 5 + k:14 + k] = True
            for e, out in zip(engines, outs):
                out.append(e(torch.where(m, x + k + 1, x)))
                if k % 2:
                    e.commit()
            plain, offloaded = (e.store._slots[e.store.keys()[0]] for e in engines)
            assert offloaded.location == "host" and plain.location == "device"
            for a, b in zip(plain.tensors(), offloaded.tensors()):
                assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="offload must be"):
        engines[0].store.offload = "cuda"


# -- errors ------------------------------------------------------------------------------------
def test_bad_inputs_get_specific_errors(unet, vae, embeddings, picture, sdedit_run):
    cond, _ = embeddings
    image, edited, mask = picture
    with pytest.raises(ValueError, match="cross_attention_dim 32"):
        DiffusionEditor(unet, torch.zeros(1, 77, 768))
    with pytest.raises(ValueError, match="task must be"):
        DiffusionEditor(unet, cond, task="outpaint")
    with pytest.raises(ValueError, match="strength must be"):
        DiffusionEditor(unet, cond, strength=0.0)
    with pytest.raises(EngineError, match="call record"):
        DiffusionEditor(unet, cond, vae=vae, steps=4, progress=False).edit(edited, mask)
    editor = sdedit_run[0]
    with pytest.raises(ValueError, match=r"must be in \[-1, 1\]"):
        editor.edit((image + 1) * 127.5, mask)
    with pytest.raises(ValueError, match="multiples of the VAE's down-sampling factor 8"):
        editor.edit(image[..., :100, :100], mask[:100, :100])
    with pytest.raises(ValueError, match="compiled for images of shape"):
        editor.record(image[..., :64, :64])
    with pytest.raises(ValueError, match="paint it at the image's size"):
        editor.edit(edited, mask[:64])
    with pytest.raises(TypeError, match="boolean"):
        editor.edit(edited, mask.float())
    with pytest.raises(ValueError, match="SDEdit needs the edited image"):
        editor.edit(mask=mask)


# -- the example and the benchmark, quick ----------------------------------------------------------
def test_example_writes_the_pngs(tmp_path, capsys):
    from PIL import Image
    sys.path.insert(0, str(ROOT))
    from examples import sdedit as example
    out = tmp_path / "sdedit"
    run = example.main(["--config", "sd-tiny", "--size", "64", "--steps", "2", "--strength", "1", "--guidance", "0",
                        "--mask", "ellipse:0.5,0.5,0.2,0.15", "--synthetic", "--threads", "1", "--out", str(out)])
    names = {"original.png", "edited_input.png", "original_result.png", "dense.png", "incremental.png", "difference.png"}
    assert names <= {p.name for p in out.iterdir()}
    for name in names:
        assert Image.open(out / name).size == (64, 64)
    printed = capsys.readouterr().out
    assert "edit, incremental:" in printed and "edit, dense:" in printed
    result = run["result"]
    assert result.steps == [0, 1] and result.dense_image is not None
    # the edited input really carries the painted mask and nothing else
    edited = np.asarray(Image.open(out / "edited_input.png"), dtype=np.int16)
    original = np.asarray(Image.open(out / "original.png"), dtype=np.int16)
    changed = np.abs(edited - original).max(axis=-1) > 0
    painted = example.paint_mask("ellipse:0.5,0.5,0.2,0.15", 64)
    assert not (changed & ~(np.asarray(painted) > 127)).any() and changed.any()


def test_benchmark_quick(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks import sd_unet as bench
    result = bench.main(["--quick", "--threads", "1", "--json", str(tmp_path / "sd.json")])
    saved = json.loads((tmp_path / "sd.json").read_text())
    assert saved["config"] == "sd-tiny" and [r["fraction"] for r in saved["rows"]] == [0.017, 0.05, 0.15, 0.0]
    for row in result["rows"][:3]:
        assert 0 < row["incremental_macs"] < row["dense_macs"] and row["psnr_db"] > 0
        assert row["dense_s"][1] <= row["dense_s"][0] <= row["dense_s"][2]
    assert result["rows"][3]["incremental_macs"] == 0 and result["rows"][3]["psnr_db"] == math.inf
    loop = result["loop"]
    assert loop["steps"] == len(loop["step_indices"]) == 2 and loop["record_overhead"] > 0
    assert loop["speedup"] == loop["dense_edited_s"] / loop["edited_s"] and loop["psnr_db"] > 20
    assert set(loop["slot_bytes"]) == {"unet", "vae_encoder", "vae_decoder"}
