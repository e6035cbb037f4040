"""``sigec demo``: edit a synthetic picture and compare a dense run with the incremental engine.

The demo builds the small seeded DDPM-style UNet (``ddpm_unet("demo")``), records it on a
synthetic "original image", paints an elliptical blob over about ``edit_fraction`` of it and
runs the edited image both densely and through the engine. It reports latency, MACs and the
PSNR of the incremental output against the dense one, and writes a five-panel PNG.
"""
from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path
from typing import Union

import torch
from PIL import Image, ImageDraw

import sigec
from sigec.edits import ellipse_mask as _ellipse
from sigec.measure import psnr, time_ms
from sigec.models import ddpm_unet

log = logging.getLogger("sigec.demo")

SIZE = 64            # the "demo" UNet's resolution
TIMESTEP = 500       # a mid-trajectory step, as in an SDEdit-style edit
NOISE_STD = 0.1      # "a little" noise: enough to look like a noised latent, not enough to hide the picture
UPSCALE = 4          # 64 px panels are too small to look at; nearest keeps the pixels honest
LABEL_HEIGHT = 18
PAD = 6
EDIT_COLOUR = (0.95, -0.55, -0.45)   # a red that appears nowhere in the original picture
POLICIES = ("sige", "exact")


def synthetic_image(size: int = SIZE, seed: int = 0) -> torch.Tensor:
    """A smooth deterministic picture in [-1, 1] (sky, sun, hills, a house) plus seeded noise.

    Returns a ``(1, 3, size, size)`` float tensor.
    """
    ys = torch.linspace(0.0, 1.0, size).view(size, 1).expand(size, size)
    xs = torch.linspace(0.0, 1.0, size).view(1, size).expand(size, size)
    # sky: a vertical blue gradient, lighter towards the horizon
    img = torch.stack([-0.6 + 0.8 * ys, -0.2 + 0.6 * ys, 0.9 - 0.2 * ys])
    # sun: a yellow disc in the upper left
    sun = (xs - 0.25) ** 2 + (ys - 0.22) ** 2 < 0.1 ** 2
    img[:, sun] = torch.tensor([0.95, 0.85, -0.2]).view(3, 1)
    # hills: a sinusoidal horizon, green getting darker towards the bottom
    ground = ys > 0.62 + 0.06 * torch.sin(xs * 2 * math.pi * 1.5)
    green = torch.stack([-0.5 - 0.3 * ys, 0.5 - 0.5 * ys, -0.6 - 0.2 * ys])
    img = torch.where(ground, green, img)
    # house: a grey wall with a darker door
    wall = (xs > 0.6) & (xs < 0.85) & (ys > 0.45) & (ys < 0.7)
    img[:, wall] = torch.tensor([0.3, 0.25, 0.2]).view(3, 1)
    door = (xs > 0.69) & (xs < 0.76) & (ys > 0.57) & (ys < 0.7)
    img[:, door] = torch.tensor([-0.4, -0.55, -0.7]).view(3, 1)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 3, size, size, generator=g)
    return (img[None] + NOISE_STD * noise).clamp(-1.0, 1.0)


def ellipse_mask(size: int, fraction: float) -> torch.Tensor:
    """The demo's edit: a tilted ellipse over about ``fraction`` of a ``size x size`` image."""
    return _ellipse(size, size, fraction, centre=(0.45, 0.58), aspect=1.8, angle_deg=25.0)


def paint(x: torch.Tensor, mask: torch.Tensor, colour=EDIT_COLOUR, seed: int = 0) -> torch.Tensor:
    """Paint ``colour`` (with the original's noise texture) into ``x`` where ``mask`` is set.

    Only masked pixels change, so the engine's difference mask equals ``mask``.
    """
    g = torch.Generator().manual_seed(seed + 1)
    texture = NOISE_STD * torch.randn(x.shape, generator=g)
    blob = (torch.tensor(colour, dtype=x.dtype).view(1, 3, 1, 1) + texture).clamp(-1.0, 1.0)
    return torch.where(mask.view(1, 1, *mask.shape), blob, x)


def _to_pixels(img: torch.Tensor) -> Image.Image:
    """``(1, 3, H, W)`` tensor in [-1, 1] -> upscaled RGB image."""
    arr = ((img[0].clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    pil = Image.fromarray(arr.permute(1, 2, 0).contiguous().numpy(), mode="RGB")
    return pil.resize((pil.width * UPSCALE, pil.height * UPSCALE), Image.NEAREST)


def _gray_pixels(values: torch.Tensor) -> Image.Image:
    """``(H, W)`` tensor in [0, 1] -> upscaled RGB image (gray)."""
    arr = (values.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    pil = Image.fromarray(arr.numpy(), mode="L").convert("RGB")
    return pil.resize((pil.width * UPSCALE, pil.height * UPSCALE), Image.NEAREST)


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


def format_table(results: dict) -> str:
    """The demo's figures as a short plain-text table."""
    def latency(prefix: str) -> str:
        return (f"{results[prefix + '_ms']:.1f} ms [{results[prefix + '_ms_min']:.1f}, "
                f"{results[prefix + '_ms_max']:.1f}]")

    rows = [
        ("policy", f"{results['policy']} ({results['threads']} threads, {results['repeats']} repeats)"),
        ("dense latency", latency("dense")),
        ("incremental latency", latency("incremental")),
        ("speedup", f"{results['speedup']:.2f}x"),
        ("dense GMACs", f"{results['dense_macs'] / 1e9:.3f}"),
        ("incremental GMACs", f"{results['incremental_macs'] / 1e9:.3f}"),
        ("MAC reduction", f"{results['mac_reduction']:.2f}x"),
        ("edited area", f"{results['edited_fraction']:.1%}"),
        ("PSNR (incr. vs dense)", f"{results['psnr_db']:.1f} dB"),
        ("image", str(results["out_path"])),
    ]
    key_width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{key_width}}  {v}" for k, v in rows)


def run_demo(out_path: Union[str, Path], policy: str = "sige", edit_fraction: float = 0.05,
             threads: int = 2, repeats: int = 5, seed: int = 0) -> dict:
    """Run the demo, write the PNG to ``out_path``, print a table and return the figures.

    Latencies are medians (with min and max) over ``repeats`` runs after one warm-up; the
    incremental runs each edit the recorded original, so repeating them is valid.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if threads < 1 or repeats < 1:
        raise ValueError(f"threads and repeats must be at least 1, got {threads} and {repeats}")
    out_path = Path(out_path)
    mask = ellipse_mask(SIZE, edit_fraction)   # validates edit_fraction before the slow part

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = ddpm_unet("demo", seed=seed)
        x = synthetic_image(SIZE, seed)
        t = torch.tensor([TIMESTEP])
        x_edit = paint(x, mask, seed=seed)

        log.info("compiling ddpm_unet('demo') with policy %r", policy)
        engine = sigec.compile(model, (x, t), policy=policy)
        engine(x, t)                            # record the original (dense run, fills the cache)

        def dense() -> torch.Tensor:
            with torch.no_grad():
                return model(x_edit, t).sample

        def incremental() -> torch.Tensor:
            return engine(x_edit, t).sample

        dense_times = time_ms(dense, repeats, 1, "dense")
        incr_times = time_ms(incremental, repeats, 1, "incremental")
        y_dense, y_incr = dense(), incremental()
        report = engine.report()
    finally:
        torch.set_num_threads(previous_threads)

    if report.incremental_macs is None:
        # build_report leaves it unset only when the engine has no edit statistics
        raise sigec.EngineError("the engine produced no report for the edit")
    if report.input_mask_fraction is not None and abs(report.input_mask_fraction - float(mask.float().mean())) > 1e-9:
        log.warning("the engine's edit mask (%.2f%%) differs from the painted one (%.2f%%)",
                    100 * report.input_mask_fraction, 100 * float(mask.float().mean()))

    diff = (y_incr - y_dense).abs().amax(dim=1)[0]    # worst channel per pixel
    max_diff = float(diff.max())
    # the panel is stretched so the largest difference is white; the label gives that value
    diff_label = f"|incr - dense|: 0..{max_diff:.2g} -> black..white" if max_diff > 0 else "|incr - dense| = 0"
    edited = float(mask.float().mean())
    size = save_grid(out_path, [
        ("original input", _to_pixels(x)),
        (f"edit mask ({edited:.1%} of pixels)", _gray_pixels(mask.float())),
        ("dense output", _to_pixels(y_dense)),
        (f"incremental output ({policy})", _to_pixels(y_incr)),
        (diff_label, _gray_pixels(diff / max_diff if max_diff > 0 else diff)),
    ])

    dense_ms, incr_ms = statistics.median(dense_times), statistics.median(incr_times)
    results = {
        "policy": policy, "threads": threads, "repeats": repeats, "seed": seed,
        "dense_ms": dense_ms, "dense_ms_min": min(dense_times), "dense_ms_max": max(dense_times),
        "incremental_ms": incr_ms, "incremental_ms_min": min(incr_times),
        "incremental_ms_max": max(incr_times),
        "speedup": dense_ms / incr_ms,
        "dense_macs": report.dense_macs, "incremental_macs": report.incremental_macs,
        "mac_reduction": report.dense_macs / report.incremental_macs if report.incremental_macs else math.inf,
        "edited_fraction": edited, "psnr_db": psnr(y_incr, y_dense), "max_abs_diff": max_diff,
        "out_path": str(out_path), "image_size": size,
    }
    print(format_table(results))
    return results
