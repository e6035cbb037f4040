"""``sigec demo``: run an edit densely and through the incremental engine, and show both.

The default model is the trained landscape generator (``sigec.frontends.landscape_demo``: a brush
stroke on a 256x512 label map). ``model="digits-ddpm"`` SDEdits a digit with the small DDPM that
ships with sigec (``sigec.models.load("digits-ddpm")``, 16x16 digits). That demo

1. samples 64 digits (DDIM, one batch) and picks the most 1-like with a nearest-mean labeller (the
   class means ship in the model's manifest, so no scikit-learn is needed);
2. paints a bar across its top, as if turning the 1 into a 7 (or, with ``edit_fraction``, an
   elliptical stroke of that size that swaps ink and paper);
3. runs SDEdit on the edited digit: noise it to ``strength`` with the same noise as the original
   and denoise with DDIM. The *dense* run calls the UNet; the *incremental* run calls an engine
   from ``sigec.compile``, which first records the original digit's trajectory (one cache slot
   per timestep, picked by the timestep's value) and then recomputes, at every step, only what
   the edit mask reaches (the SIGE paper's protocol: the same mask for every step);
4. writes one picture (original, edit, dense result, incremental result, difference) and prints
   latency, MACs and PSNR.

``model="random-unet"`` runs the earlier synthetic demo: one step of a seeded random 64x64 UNet on a
synthetic picture (speed and MACs only; random weights make no pictures).

The sampling helpers (``ddim_sample``, ``sdedit``) take any ``denoise(x, t) -> noise`` function,
so the benchmarks and tests use them with the dense UNet and with engines alike.
"""
from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import sigec
from sigec.frontends.edits import ellipse_mask as _ellipse
from sigec.frontends.measure import psnr, time_ms

log = logging.getLogger("sigec.frontends.demo")

MODELS = ("landscape", "digits-ddpm", "random-unet")
POLICIES = ("sige", "exact")
PANEL = 256            # every panel is upscaled (nearest) to this many pixels
LABEL_HEIGHT = 18
PAD = 6

#: ``denoise(x_t, t) -> predicted noise``: the dense UNet, or an engine
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# sampling and SDEdit with any denoiser

def ddim_scheduler(scheduler_config: dict, steps: int):
    """A diffusers ``DDIMScheduler`` from a DDPM training configuration, set to ``steps`` steps."""
    from diffusers import DDIMScheduler

    if steps < 1:
        raise ValueError(f"DDIM steps must be at least 1, got {steps}")
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    return scheduler


def unet_denoiser(unet: torch.nn.Module) -> Denoiser:
    """The dense UNet as a denoiser (the timestep broadcast over the batch)."""
    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return unet(x, timestep_batch(t, len(x))).sample
    return denoise


def engine_denoiser(engine: "sigec.Engine", mask: Optional[torch.Tensor] = None) -> Denoiser:
    """An engine as a denoiser: each timestep has its own slot (keyed by the timestep's value), so
    the first pass over a trajectory records and later passes run incrementally within ``mask``."""
    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return engine(x, timestep_batch(t, len(x)), mask=mask).sample
    return denoise


def timestep_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """The scheduler's scalar timestep as the ``(batch,)`` int64 tensor the UNet is compiled for."""
    return torch.full((batch,), int(t), dtype=torch.long)


def ddim_sample(denoise: Denoiser, scheduler, noise: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM sampling (eta 0) from ``noise`` over the scheduler's timesteps."""
    x = noise
    for t in scheduler.timesteps:
        x = scheduler.step(denoise(x, t), t, x).prev_sample
    return x


def sdedit_timesteps(scheduler, strength: float) -> torch.Tensor:
    """The last ``strength`` of the scheduler's timesteps (SDEdit starts at the first of them)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"SDEdit strength must be in (0, 1], got {strength}")
    count = max(1, round(len(scheduler.timesteps) * strength))
    return scheduler.timesteps[len(scheduler.timesteps) - count:]


def sdedit(denoise: Denoiser, scheduler, image: torch.Tensor, noise: torch.Tensor, strength: float) -> torch.Tensor:
    """SDEdit (Meng et al. 2022): noise ``image`` to the level of ``strength`` with ``noise``, then
    denoise it with DDIM. The same ``noise`` for an original and an edited image makes their
    trajectories differ only through the edit."""
    timesteps = sdedit_timesteps(scheduler, strength)
    x = scheduler.add_noise(image, noise, timesteps[:1])
    for t in timesteps:
        x = scheduler.step(denoise(x, t), t, x).prev_sample
    return x


# ---------------------------------------------------------------------------------------------
# digits: labelling and edits

def digit_features(images: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)`` images in [-1, 1] -> ``(N, 64)``: 8x8 area averages in [0, 1] (the digits
    data set's 0..16 scaled by 1/16)."""
    small = F.adaptive_avg_pool2d(images.float(), 8)
    return ((small + 1.0) / 2.0).clamp(0.0, 1.0).reshape(len(images), 64)


def nearest_mean_distances(images: torch.Tensor, class_means: list) -> torch.Tensor:
    """``(N, 10)`` distances of each image's 8x8 features to each digit's mean image."""
    return torch.cdist(digit_features(images), torch.tensor(class_means, dtype=torch.float32))


def nearest_mean_labels(images: torch.Tensor, class_means: list) -> torch.Tensor:
    """The digit whose mean 8x8 image is nearest to each image's (about 90% right on the data)."""
    return nearest_mean_distances(images, class_means).argmin(dim=1)


def bar_edit(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Paint a bar of ink across the top of a 16x16 digit (a 1 becomes a T-shaped 7).

    The bar is a quarter of the image high, starts at the digit's first row of ink (rounded down
    to an even row: the digits are 8x8 pictures upscaled twice) and spans columns 4 to 13. A
    thinner bar is not enough: SDEdit takes it for noise and paints the 1 back. Returns the edited
    image and the bar's mask (H x W, bool).
    """
    h, w = image.shape[-2:]
    ink_rows = (image[0, 0] > 0.0).any(dim=1).nonzero()
    top = int(ink_rows[0]) if len(ink_rows) else 0
    top -= top % 2
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[top:top + h // 4, w // 4:w - w // 8] = True
    return torch.where(mask, torch.ones_like(image), image), mask


def stroke_edit(image: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """An elliptical stroke covering ``fraction`` of the image that swaps ink and paper."""
    h, w = image.shape[-2:]
    mask = _ellipse(h, w, fraction, centre=(0.6, 0.4), aspect=1.5)
    return torch.where(mask, -image, image), mask


# ---------------------------------------------------------------------------------------------
# pictures

def _gray_panel(img: torch.Tensor, lo: float = -1.0, hi: float = 1.0) -> Image.Image:
    """``(H, W)`` values in [lo, hi] -> a ``PANEL``-pixel RGB image (nearest: pixels stay honest)."""
    arr = ((img.float() - lo) / (hi - lo) * 255.0).clamp(0, 255).round().to(torch.uint8)
    return Image.fromarray(arr.numpy(), mode="L").convert("RGB").resize((PANEL, PANEL), Image.NEAREST)


def _rgb_panel(img: torch.Tensor) -> Image.Image:
    """``(3, H, W)`` in [-1, 1] -> a ``PANEL``-pixel RGB image."""
    arr = ((img.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).contiguous().numpy(), mode="RGB").resize((PANEL, PANEL), Image.NEAREST)


def _with_outline(panel: Image.Image, mask: torch.Tensor, colour=(230, 60, 40)) -> Image.Image:
    """Outline the mask's pixels on an upscaled panel (the edges between masked and unmasked)."""
    h, w = mask.shape
    sy, sx = panel.height / h, panel.width / w
    draw = ImageDraw.Draw(panel)
    m = mask.tolist()
    for y in range(h):
        for x in range(w):
            if not m[y][x]:
                continue
            x0, y0, x1, y1 = x * sx, y * sy, (x + 1) * sx - 1, (y + 1) * sy - 1
            if y == 0 or not m[y - 1][x]:
                draw.line([(x0, y0), (x1, y0)], fill=colour, width=2)
            if y == h - 1 or not m[y + 1][x]:
                draw.line([(x0, y1), (x1, y1)], fill=colour, width=2)
            if x == 0 or not m[y][x - 1]:
                draw.line([(x0, y0), (x0, y1)], fill=colour, width=2)
            if x == w - 1 or not m[y][x + 1]:
                draw.line([(x1, y0), (x1, y1)], fill=colour, width=2)
    return panel


def save_grid(path: Path, panels: list[tuple[str, Image.Image]]) -> tuple[int, int]:
    """Write labelled panels side by side into one PNG; returns its (width, height)."""
    pw, ph = panels[0][1].size
    width = len(panels) * pw + (len(panels) + 1) * PAD
    height = LABEL_HEIGHT + ph + 2 * PAD
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (label, panel) in enumerate(panels):
        left = PAD + i * (pw + PAD)
        draw.text((left, PAD // 2), label, fill=(0, 0, 0))
        grid.paste(panel, (left, PAD + LABEL_HEIGHT))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, format="PNG")
    return grid.size


def _difference_panel(a: torch.Tensor, b: torch.Tensor) -> tuple[str, Image.Image]:
    """The per-pixel worst-channel |a - b| stretched so the largest is white, and its label."""
    diff = (a - b).abs().amax(dim=0)
    top = float(diff.max())
    label = f"|incr - dense|: 0..{top:.2g} -> black..white" if top > 0 else "|incr - dense| = 0"
    return label, _gray_panel(diff, 0.0, top if top > 0 else 1.0)


def format_table(results: dict) -> str:
    """The demo's figures as a short plain-text table."""
    def latency(prefix: str) -> str:
        return (f"{results[prefix + '_ms']:.1f} ms [{results[prefix + '_ms_min']:.1f}, "
                f"{results[prefix + '_ms_max']:.1f}]")

    rows = [("model", results["model"])]
    if "steps" in results:
        rows += [("edit", results["edit"]),
                 ("SDEdit", f"strength {results['strength']}: {results['steps']} of {results['ddim_steps']} DDIM steps")]
    unit = "per edit" if "steps" in results else "per call"
    rows += [
        ("policy", f"{results['policy']} ({results['threads']} threads, {results['repeats']} repeats)"),
        (f"dense latency {unit}", latency("dense")),
        (f"incr. latency {unit}", latency("incremental")),
        ("speedup", f"{results['speedup']:.2f}x"),
        (f"dense GMACs {unit}", f"{results['dense_macs'] / 1e9:.3f}"),
        (f"incr. GMACs {unit}", f"{results['incremental_macs'] / 1e9:.3f}"),
        ("MAC reduction", f"{results['mac_reduction']:.2f}x"),
        ("edited area", f"{results['edited_fraction']:.1%}"),
        ("PSNR (incr. vs dense)", f"{results['psnr_db']:.1f} dB"),
    ]
    if "psnr_unedited_db" in results:
        rows.append(("PSNR (no recompute)", f"{results['psnr_unedited_db']:.1f} dB (the original's result vs dense)"))
    rows.append(("image", str(results["out_path"])))
    key_width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{key_width}}  {v}" for k, v in rows)


# ---------------------------------------------------------------------------------------------
# the digits demo

def pick_digit(unet, scheduler_config: dict, class_means: list, want: int, seed: int,
               candidates: int = 64, ddim_steps: int = 50) -> tuple[torch.Tensor, int]:
    """Sample ``candidates`` digits in one batch and return the one that looks most like ``want``:
    nearest to its mean image by the widest margin (or the first sample, when none is nearest)."""
    noise = torch.randn((candidates, *unet_input_shape(unet)), generator=torch.Generator().manual_seed(seed))
    samples = ddim_sample(unet_denoiser(unet), ddim_scheduler(scheduler_config, ddim_steps), noise)
    distances = nearest_mean_distances(samples, class_means)
    others = torch.cat([distances[:, :want], distances[:, want + 1:]], dim=1)
    margin = others.min(dim=1).values - distances[:, want]     # > 0 where ``want`` is the nearest
    index = int(margin.argmax())
    label = int(distances[index].argmin())
    if label != want:
        log.warning("no %d among %d samples (seed %d); editing a %d instead", want, candidates, seed, label)
    return samples[index:index + 1], label


def unet_input_shape(unet) -> tuple[int, int, int]:
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (unet.config.in_channels, *size)


def _timed_runs(fn: Callable[[], torch.Tensor], repeats: int, desc: str) -> tuple[list[float], torch.Tensor]:
    out = {}

    def call():
        out["y"] = fn()
    times = time_ms(call, repeats, 1, desc)
    return times, out["y"]


def run_digits_demo(out_path: Union[str, Path], policy: str = "sige", edit_fraction: Optional[float] = None,
                    threads: int = 2, repeats: int = 5, seed: int = 0, ddim_steps: int = 50,
                    strength: float = 0.5) -> dict:
    """SDEdit a generated "1" into a "7" with the shipped digits model; see the module docstring."""
    from sigec.models import load, read_manifest

    out_path = Path(out_path)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        unet, scheduler_config = load("digits-ddpm")
        class_means = read_manifest("digits-ddpm")["class_means_8x8"]
        original, label = pick_digit(unet, scheduler_config, class_means, want=1, seed=seed)
        if edit_fraction is None:
            edited, mask = bar_edit(original)
            edit = f"a bar across the top of a {label} ({float(mask.float().mean()):.1%} of the pixels)"
        else:
            edited, mask = stroke_edit(original, edit_fraction)
            edit = f"an elliptical stroke over a {label} ({float(mask.float().mean()):.1%} of the pixels)"
        scheduler = ddim_scheduler(scheduler_config, ddim_steps)
        steps = len(sdedit_timesteps(scheduler, strength))
        noise = torch.randn(original.shape, generator=torch.Generator().manual_seed(seed + 1))

        log.info("compiling the digits UNet with policy %r", policy)
        t0 = timestep_batch(scheduler.timesteps[0], 1)
        engine = sigec.compile(unet, (original, t0), policy=policy)
        # record: the original's trajectory fills one slot per timestep
        unedited = sdedit(engine_denoiser(engine), scheduler, original, noise, strength)

        dense_times, y_dense = _timed_runs(
            lambda: sdedit(unet_denoiser(unet), scheduler, edited, noise, strength), repeats, "dense")
        incr_times, y_incr = _timed_runs(
            lambda: sdedit(engine_denoiser(engine, mask), scheduler, edited, noise, strength), repeats, "incremental")
        report = engine.report(mask=mask)
    finally:
        torch.set_num_threads(previous_threads)

    edited_fraction = float(mask.float().mean())
    diff_label, diff_panel = _difference_panel(y_incr[0], y_dense[0])
    size = save_grid(out_path, [
        (f"original (sampled {label})", _gray_panel(original[0, 0])),
        (f"edit ({edited_fraction:.1%} of pixels)", _with_outline(_gray_panel(edited[0, 0]), mask)),
        ("dense SDEdit", _gray_panel(y_dense[0, 0])),
        (f"incremental SDEdit ({policy})", _gray_panel(y_incr[0, 0])),
        (diff_label, diff_panel),
    ])
    dense_ms, incr_ms = statistics.median(dense_times), statistics.median(incr_times)
    dense_macs, incr_macs = report.dense_macs * steps, report.incremental_macs * steps
    results = {
        "model": "digits-ddpm", "edit": edit, "label": label, "policy": policy, "threads": threads,
        "repeats": repeats, "seed": seed, "strength": strength, "ddim_steps": ddim_steps, "steps": steps,
        "dense_ms": dense_ms, "dense_ms_min": min(dense_times), "dense_ms_max": max(dense_times),
        "incremental_ms": incr_ms, "incremental_ms_min": min(incr_times), "incremental_ms_max": max(incr_times),
        "speedup": dense_ms / incr_ms, "dense_macs": dense_macs, "incremental_macs": incr_macs,
        "mac_reduction": dense_macs / incr_macs if incr_macs else math.inf,
        "edited_fraction": edited_fraction, "psnr_db": psnr(y_incr, y_dense),
        "psnr_unedited_db": psnr(unedited, y_dense), "max_abs_diff": float((y_incr - y_dense).abs().max()),
        "out_path": str(out_path), "image_size": size,
        "images": {"original": original, "edited": edited, "mask": mask, "dense": y_dense,
                   "incremental": y_incr, "unedited": unedited},
    }
    print(format_table(results))
    return results


# ---------------------------------------------------------------------------------------------
# the synthetic demo with a random UNet (model="random-unet")

RANDOM_SIZE = 64           # the "demo" UNet's resolution
RANDOM_TIMESTEP = 500      # a mid-trajectory step
NOISE_STD = 0.1            # enough to look like a noised latent, not enough to hide the picture
EDIT_COLOUR = (0.95, -0.55, -0.45)   # a red that appears nowhere in the synthetic picture


def synthetic_image(size: int = RANDOM_SIZE, seed: int = 0) -> torch.Tensor:
    """A smooth deterministic picture in [-1, 1] (sky, sun, hills, a house) plus seeded noise.

    Returns a ``(1, 3, size, size)`` float tensor.
    """
    ys = torch.linspace(0.0, 1.0, size).view(size, 1).expand(size, size)
    xs = torch.linspace(0.0, 1.0, size).view(1, size).expand(size, size)
    img = torch.stack([-0.6 + 0.8 * ys, -0.2 + 0.6 * ys, 0.9 - 0.2 * ys])   # sky
    sun = (xs - 0.25) ** 2 + (ys - 0.22) ** 2 < 0.1 ** 2
    img[:, sun] = torch.tensor([0.95, 0.85, -0.2]).view(3, 1)
    ground = ys > 0.62 + 0.06 * torch.sin(xs * 2 * math.pi * 1.5)            # hills
    green = torch.stack([-0.5 - 0.3 * ys, 0.5 - 0.5 * ys, -0.6 - 0.2 * ys])
    img = torch.where(ground, green, img)
    wall = (xs > 0.6) & (xs < 0.85) & (ys > 0.45) & (ys < 0.7)               # house
    img[:, wall] = torch.tensor([0.3, 0.25, 0.2]).view(3, 1)
    door = (xs > 0.69) & (xs < 0.76) & (ys > 0.57) & (ys < 0.7)
    img[:, door] = torch.tensor([-0.4, -0.55, -0.7]).view(3, 1)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 3, size, size, generator=g)
    return (img[None] + NOISE_STD * noise).clamp(-1.0, 1.0)


def ellipse_mask(size: int, fraction: float) -> torch.Tensor:
    """The synthetic demo's edit: a tilted ellipse over about ``fraction`` of a ``size x size`` image."""
    return _ellipse(size, size, fraction, centre=(0.45, 0.58), aspect=1.8, angle_deg=25.0)


def paint(x: torch.Tensor, mask: torch.Tensor, colour=EDIT_COLOUR, seed: int = 0) -> torch.Tensor:
    """Paint ``colour`` (with the original's noise texture) into ``x`` where ``mask`` is set."""
    g = torch.Generator().manual_seed(seed + 1)
    texture = NOISE_STD * torch.randn(x.shape, generator=g)
    blob = (torch.tensor(colour, dtype=x.dtype).view(1, 3, 1, 1) + texture).clamp(-1.0, 1.0)
    return torch.where(mask.view(1, 1, *mask.shape), blob, x)


def run_random_unet_demo(out_path: Union[str, Path], policy: str = "sige", edit_fraction: Optional[float] = None,
                         threads: int = 2, repeats: int = 5, seed: int = 0) -> dict:
    """One denoising step of the seeded random ``ddpm_unet("demo")`` on a synthetic picture."""
    from sigec.models import ddpm_unet

    out_path = Path(out_path)
    mask = ellipse_mask(RANDOM_SIZE, 0.05 if edit_fraction is None else edit_fraction)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = ddpm_unet("demo", seed=seed)
        x = synthetic_image(RANDOM_SIZE, seed)
        t = torch.tensor([RANDOM_TIMESTEP])
        x_edit = paint(x, mask, seed=seed)
        engine = sigec.compile(model, (x, t), policy=policy)
        engine(x, t)                            # record the original (dense run, fills the cache)
        dense_times, y_dense = _timed_runs(lambda: unet_denoiser(model)(x_edit, t), repeats, "dense")
        incr_times, y_incr = _timed_runs(lambda: engine(x_edit, t).sample, repeats, "incremental")
        report = engine.report()
    finally:
        torch.set_num_threads(previous_threads)

    edited = float(mask.float().mean())
    diff_label, diff_panel = _difference_panel(y_incr[0], y_dense[0])
    size = save_grid(out_path, [
        ("original input", _rgb_panel(x[0])),
        (f"edit mask ({edited:.1%} of pixels)", _gray_panel(mask.float(), 0.0, 1.0)),
        ("dense output", _rgb_panel(y_dense[0])),
        (f"incremental output ({policy})", _rgb_panel(y_incr[0])),
        (diff_label, diff_panel),
    ])
    dense_ms, incr_ms = statistics.median(dense_times), statistics.median(incr_times)
    results = {
        "model": "random-unet (seeded random weights, one step)", "policy": policy, "threads": threads,
        "repeats": repeats, "seed": seed,
        "dense_ms": dense_ms, "dense_ms_min": min(dense_times), "dense_ms_max": max(dense_times),
        "incremental_ms": incr_ms, "incremental_ms_min": min(incr_times), "incremental_ms_max": max(incr_times),
        "speedup": dense_ms / incr_ms, "dense_macs": report.dense_macs, "incremental_macs": report.incremental_macs,
        "mac_reduction": report.dense_macs / report.incremental_macs if report.incremental_macs else math.inf,
        "edited_fraction": edited, "psnr_db": psnr(y_incr, y_dense),
        "max_abs_diff": float((y_incr - y_dense).abs().max()), "out_path": str(out_path), "image_size": size,
    }
    print(format_table(results))
    return results


def run_demo(out_path: Union[str, Path], model: str = "landscape", policy: Optional[str] = None,
             edit_fraction: Optional[float] = None, threads: int = 2, repeats: int = 5, seed: int = 0,
             brush_class: str = "water") -> dict:
    """Run the demo for ``model``, write the PNG to ``out_path``, print a table, return the figures.

    ``policy`` defaults to ``exact`` for the landscape generator (a local network: the result
    equals dense) and ``sige`` for the diffusion UNets (whose group norms are global). Latencies
    are medians (with min and max) over ``repeats`` runs after one warm-up; the incremental runs
    each edit the recorded original, so repeating them is valid.
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    policy = policy or ("exact" if model == "landscape" else "sige")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if threads < 1 or repeats < 1:
        raise ValueError(f"threads and repeats must be at least 1, got {threads} and {repeats}")
    if edit_fraction is not None and not 0.0 < edit_fraction <= 1.0:
        raise ValueError(f"edit fraction must be in (0, 1], got {edit_fraction}")
    if model == "landscape":
        from sigec.frontends.landscape_demo import run_landscape_demo

        return run_landscape_demo(out_path, policy=policy, edit_fraction=edit_fraction or 0.02,
                                  brush_class=brush_class, threads=threads, repeats=repeats, seed=seed)
    run = run_digits_demo if model == "digits-ddpm" else run_random_unet_demo
    return run(out_path, policy=policy, edit_fraction=edit_fraction, threads=threads, repeats=repeats, seed=seed)
