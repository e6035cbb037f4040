"""``sigec.diffusion.incremental(pipe)`` on diffusers pipelines built from configurations with seeded
random weights: recording equals the plain pipeline, an empty edit replays bit for bit, a full mask
equals the dense pipeline, edits follow ``DiffusionEditor``'s protocol, and every change of settings,
seed, scheduler or weights is re-recorded or refused by the documented rule."""
import pytest
import torch

pytest.importorskip("transformers")  # diffusers' pipelines import it

from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler  # noqa: E402

from sigec.diffusion import DiffusionEditor  # noqa: E402
from sigec.diffusion.pipelines import IncrementalPipeline, PipelineChangedError, incremental  # noqa: E402
from sigec.diffusion.random_pipelines import prompt_embeddings, sd_pipeline  # noqa: E402
from sigec.models import SDXL_POOLED_DIM  # noqa: E402

SIZE = 128  # pixels; the latent is 16x16
FAST = dict(expected_active_fraction=0.05)  # one plan per engine: compiles in a third of the time


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


def _image(seed=0, channels=3, size=SIZE):
    return torch.rand(1, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _edited(image, value=0.5):
    out = image.clone()
    out[..., 40:56, 40:60] = value
    return out


def _plain(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(**kwargs).images


@pytest.fixture(scope="module")
def img2img():
    """The pipeline, its call's settings, and one incremental pipeline over it (compiled once)."""
    pipe = sd_pipeline("img2img")
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(strength=0.8, num_inference_steps=5, guidance_scale=7.5, output_type="pt",
                  **prompt_embeddings(pipe.unet))
    return pipe, kwargs, incremental(pipe, **FAST)


def test_img2img_record_replay_edit_and_full_mask(img2img):
    pipe, kw, inc = img2img
    inc.reset()
    image = _image()
    recorded = inc(image=image, generator=_gen(), **kw).images
    assert inc.last.kind == "record"
    torch.testing.assert_close(recorded, _plain(pipe, image=image, generator=_gen(), **kw), rtol=1e-4, atol=1e-4)
    # an empty edit replays the recording bit for bit
    assert torch.equal(inc(image=image, generator=_gen(), **kw).images, recorded)
    assert inc.last.kind == "edit" and inc.last.edited_fraction == 0.0
    # an edit: the mask is the difference, and every model ran incrementally in its recorded slots
    edited = _edited(image)
    out = inc(image=edited, generator=_gen(), **kw).images
    assert inc.last.kind == "edit"
    assert inc.last.edited_fraction == pytest.approx(16 * 20 / SIZE ** 2)
    assert inc.last.engine_calls == {"unet": 4, "vae_encoder": 1, "vae_decoder": 1}
    assert not torch.equal(out, recorded)
    # a mask over the whole image is the dense pipeline, group norms included
    full = torch.ones(SIZE, SIZE, dtype=torch.bool)
    dense = _plain(pipe, image=edited, generator=_gen(), **kw)
    torch.testing.assert_close(inc(image=edited, generator=_gen(), mask=full, **kw).images, dense,
                               rtol=1e-4, atol=1e-4)
    # the pipeline is the user's again after each call
    assert "forward" not in pipe.unet.__dict__ and "encode" not in pipe.vae.__dict__


@pytest.mark.parametrize("policy", ["sige", "exact"])
def test_img2img_equals_the_diffusion_editor_protocol(img2img, policy):
    """On latents (``image`` with the UNet's 4 channels, ``output_type="latent"``) the img2img
    pipeline and ``DiffusionEditor`` run the same SDEdit: the same noise, DDIM steps and guidance;
    with the same mask their edits agree."""
    pipe, kw, _ = img2img
    kw = dict(kw, output_type="latent")
    latent, edited = _image(3, channels=4, size=16), None
    edited = latent.clone()
    edited[..., 5:8, 6:9] += 1.0
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[5:8, 6:9] = True
    inc = incremental(pipe, policy=policy, **FAST)
    inc(image=latent, generator=_gen(7), **kw)
    ours = inc(image=edited, generator=_gen(7), mask=mask, **kw).images
    editor = DiffusionEditor(pipe.unet, kw["prompt_embeds"], uncond_embeddings=kw["negative_prompt_embeds"],
                             guidance_scale=kw["guidance_scale"], steps=kw["num_inference_steps"],
                             strength=kw["strength"], seed=7, policy=policy, progress=False, **FAST)
    editor.record(latent)
    theirs = editor.edit(edited, mask).latents
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("change", ["prompt", "seed", "strength", "steps", "guidance", "scheduler", "weights",
                                    "output_type"])
def test_every_other_change_is_rerecorded_or_refused(img2img, change):
    pipe, kw, inc = img2img
    image = _image(1)
    base = dict(image=image, generator=_gen(), **kw)
    changed = dict(base)
    scheduler = pipe.scheduler
    weight = pipe.unet.conv_in.weight
    saved = weight.detach().clone()
    if change == "prompt":
        changed["prompt_embeds"] = kw["prompt_embeds"] + 0.1
    elif change == "seed":
        changed["generator"] = _gen(2)
    elif change == "strength":
        changed["strength"] = 0.6
    elif change == "steps":
        changed["num_inference_steps"] = 6
    elif change == "guidance":
        changed["guidance_scale"] = 3.0
    elif change == "output_type":
        changed["output_type"] = "np"
    names = {"prompt": "prompt_embeds", "seed": "generator", "strength": "strength", "steps": "num_inference_steps",
             "guidance": "guidance_scale", "scheduler": "scheduler", "weights": "weights of unet",
             "output_type": "output_type"}
    try:
        for rule in ("raise", "rerecord"):
            inc.on_change = rule
            inc.reset()
            inc(**dict(base, generator=_gen()))
            if change == "scheduler":
                pipe.scheduler = DPMSolverMultistepScheduler.from_config(scheduler.config)
            if change == "weights":  # as LoRA fusing does: in place, through .data (no version bump)
                weight.data.add_(0.01)
            call = dict(changed, generator=_gen(2) if change == "seed" else _gen())
            if rule == "raise":
                with pytest.raises(PipelineChangedError, match=names[change]):
                    inc(**call)
            else:
                inc(**call)
                assert inc.last.kind == "record" and names[change] in inc.last.changed
                inc(**dict(call, generator=_gen(2) if change == "seed" else _gen()))
                assert inc.last.kind == "edit"  # the new recording is the baseline now
            pipe.scheduler = scheduler
            weight.data.copy_(saved)
    finally:
        inc.on_change = "rerecord"
        pipe.scheduler = scheduler
        weight.data.copy_(saved)


def test_recording_needs_a_generator_and_masks_are_checked(img2img):
    pipe, kw, inc = img2img
    inc.reset()
    with pytest.raises(ValueError, match="generator="):
        inc(image=_image(), **kw)
    inc(image=_image(), generator=_gen(), **kw)
    with pytest.raises(TypeError, match="bool"):
        inc(image=_image(), generator=_gen(), mask=torch.ones(SIZE, SIZE), **kw)
    with pytest.raises(ValueError, match="image's size"):
        inc(image=_image(), generator=_gen(), mask=torch.ones(16, 16, dtype=torch.bool), **kw)
    # another image size is another recording, not an edit
    inc(image=_image(size=SIZE // 2), generator=_gen(), **kw)
    assert inc.last.kind == "record" and "editable images" in inc.last.changed
    with pytest.raises(ValueError, match="on_change"):
        IncrementalPipeline(pipe, on_change="ignore")
    with pytest.raises(TypeError, match="no unet"):
        incremental(object())


@pytest.mark.parametrize("scheduler_class", [DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_other_schedulers_and_step_callbacks(img2img, scheduler_class):
    pipe, kw, inc = img2img
    original = pipe.scheduler
    pipe.scheduler = scheduler_class.from_config(original.config)
    seen = []

    def callback(p, step, t, tensors):
        seen.append(step)
        return {"latents": tensors["latents"] * 0.99}  # a callback that changes the latents, every step

    try:
        image, edited = _image(2), _edited(_image(2))
        kwargs = dict(kw, callback_on_step_end=callback)
        inc.reset()
        recorded = inc(image=image, generator=_gen(), **kwargs).images
        torch.testing.assert_close(recorded, _plain(pipe, image=image, generator=_gen(), **kwargs),
                                   rtol=1e-4, atol=1e-4)
        assert torch.equal(inc(image=image, generator=_gen(), **kwargs).images, recorded)
        out = inc(image=edited, generator=_gen(), **kwargs).images
        assert inc.last.kind == "edit" and not torch.equal(out, recorded)
        assert seen == list(range(4)) * 4  # the callback ran on every step of every call (plain one included)
        full = torch.ones(SIZE, SIZE, dtype=torch.bool)
        torch.testing.assert_close(inc(image=edited, generator=_gen(), mask=full, **kwargs).images,
                                   _plain(pipe, image=edited, generator=_gen(), **kwargs), rtol=1e-4, atol=1e-4)
    finally:
        pipe.scheduler = original


def test_controlnet_edit_of_the_control_image():
    pipe = sd_pipeline("controlnet")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, guidance_scale=7.5, output_type="latent", height=SIZE, width=SIZE,
              **prompt_embeddings(pipe.unet))
    control = (_image(4) + 1) / 2
    inc = incremental(pipe, **FAST)
    recorded = inc(image=control, generator=_gen(), **kw).images
    torch.testing.assert_close(recorded, _plain(pipe, image=control, generator=_gen(), **kw), rtol=1e-4, atol=1e-4)
    assert torch.equal(inc(image=control, generator=_gen(), **kw).images, recorded)
    edited = _edited(control, 1.0)
    out = inc(image=edited, generator=_gen(), **kw).images
    assert inc.last.engine_calls["controlnet"] == 3 and inc.last.engine_calls["unet"] == 3
    # both ran incrementally: the ControlNet on the pixel mask, the UNet on the latent mask, its
    # skip residuals (inputs at 16, 8, 4 and 2) carrying the mask reduced to their sizes
    controlnet = next(iter(inc.models["controlnet"].engines.values()))
    unet = next(iter(inc.models["unet"].engines.values()))
    assert controlnet.context.input_resolution == (SIZE, SIZE) and not controlnet.last_stats.get("dense")
    residuals = len(pipe.controlnet.controlnet_down_blocks) + 1  # the skips' and the middle block's
    assert unet.context.input_resolution == (16, 16) and len(unet.context.spatial_inputs) == 1 + residuals
    assert 0 < int(unet.last_stats["input_mask"].sum()) < 16 * 16 // 4
    dense = _plain(pipe, image=edited, generator=_gen(), **kw)
    assert (out - dense).abs().max() < (recorded - dense).abs().max()
    full = torch.ones(SIZE, SIZE, dtype=torch.bool)
    torch.testing.assert_close(inc(image=edited, generator=_gen(), mask=full, **kw).images, dense,
                               rtol=1e-4, atol=1e-4)


def test_sdxl_replays_and_full_mask_is_dense():
    pipe = sd_pipeline("sdxl-img2img")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, strength=0.8, guidance_scale=5.0, output_type="latent",
              **prompt_embeddings(pipe.unet, pooled_dim=SDXL_POOLED_DIM["sdxl-tiny"]))
    image, edited = _image(5), _edited(_image(5))
    inc = incremental(pipe, policy="exact", **FAST)
    recorded = inc(image=image, generator=_gen(), **kw).images
    torch.testing.assert_close(recorded, _plain(pipe, image=image, generator=_gen(), **kw), rtol=1e-4, atol=1e-4)
    assert torch.equal(inc(image=image, generator=_gen(), **kw).images, recorded)
    full = torch.ones(SIZE, SIZE, dtype=torch.bool)
    torch.testing.assert_close(inc(image=edited, generator=_gen(), mask=full, **kw).images,
                               _plain(pipe, image=edited, generator=_gen(), **kw), rtol=1e-4, atol=1e-4)
    unet = next(iter(inc.models["unet"].engines.values()))
    names = [n.name for n in unet.graph_module.graph.nodes if n.op == "placeholder"]
    assert any("text_embeds" in n for n in names) and any("time_ids" in n for n in names)


def test_inpainting_edit_of_the_mask_image():
    pipe = sd_pipeline("inpaint")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, strength=1.0, guidance_scale=7.5, output_type="latent", height=SIZE,
              width=SIZE, **prompt_embeddings(pipe.unet))
    image = (_image(6) + 1) / 2
    hole = torch.zeros(1, 1, SIZE, SIZE)
    hole[..., 32:64, 32:64] = 1.0
    inc = incremental(pipe, **FAST)
    recorded = inc(image=image, mask_image=hole, generator=_gen(), **kw).images
    assert torch.equal(inc(image=image, mask_image=hole, generator=_gen(), **kw).images, recorded)
    bigger = hole.clone()
    bigger[..., 64:72, 32:64] = 1.0
    out = inc(image=image, mask_image=bigger, generator=_gen(), **kw).images
    assert inc.last.kind == "edit" and inc.last.edited_fraction == pytest.approx(8 * 32 / SIZE ** 2)
    assert not torch.equal(out, recorded)


def test_a_lora_loaded_after_recording_is_rerecorded(img2img):
    peft = pytest.importorskip("peft")
    pipe, kw, inc = img2img
    inc.reset()
    image = _image(8)
    inc(image=image, generator=_gen(), **kw)
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    pipe.unet.add_adapter(config, adapter_name="edit-style")
    try:
        out = inc(image=image, generator=_gen(), **kw).images
        assert inc.last.kind == "record" and "weights of unet" in inc.last.changed
        torch.testing.assert_close(out, _plain(pipe, image=image, generator=_gen(), **kw), rtol=1e-4, atol=1e-4)
    finally:
        pipe.unet.delete_adapters("edit-style")
