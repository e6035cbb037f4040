"""``sigec demo`` with the default model: paint a brush stroke of a class onto a landscape label
map and render the edit densely and through the incremental engine.

The model is the trained landscape generator that ships with sigec
(``sigec.models.load("landscape")``: label map + noise map -> 256x512 picture). The demo

1. renders the default scene once through the engine, which records it (fills the cache);
2. paints a wavy brush stroke of ``brush_class`` covering ``edit_fraction`` of the label map;
3. renders the edited map densely (the model itself, in its default memory format and in
   channels-last: the faster one is the baseline) and incrementally (the engine recomputes only
   the blocks the stroke reaches), timing both; the first incremental call of the stroke, which
   also saves the baselines of its blocks, is timed separately, since a painting user pays it;
4. writes one picture (label map, stroke, recomputed blocks, dense, incremental, difference) and
   prints latency, MACs and PSNR.
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageDraw

import sigec
from sigec.frontends.edits import brush_stroke_mask, wavy_stroke
from sigec.frontends.measure import output_block_mask, psnr, time_ms

log = logging.getLogger("sigec.frontends.demo")

LANDSCAPE = "landscape"
HEIGHT, WIDTH = 256, 512
NOISE_SEED = 0


def _outlined(rgb: np.ndarray, mask: torch.Tensor, colour=(230, 40, 40)) -> np.ndarray:
    """``rgb`` with the boundary pixels of ``mask`` painted in ``colour``."""
    m = mask.numpy()
    edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
    out = rgb.copy()
    out[edge] = colour
    return out


def _tinted(rgb: np.ndarray, mask: torch.Tensor, colour=(255, 60, 60), alpha: float = 0.45) -> np.ndarray:
    """``rgb`` with ``mask``'s pixels blended towards ``colour`` (the recomputed blocks)."""
    out = rgb.astype(np.float32)
    m = mask.numpy()
    out[m] = (1 - alpha) * out[m] + alpha * np.array(colour, dtype=np.float32)
    return out.round().astype(np.uint8)


def _difference(a: torch.Tensor, b: torch.Tensor) -> tuple[str, np.ndarray]:
    """Worst-channel ``|a - b|`` stretched so the largest is white, and its label."""
    diff = (a - b).abs().amax(dim=1)[0]
    top = float(diff.max())
    grey = (diff / top * 255).round().to(torch.uint8).numpy() if top > 0 else np.zeros(diff.shape, np.uint8)
    label = (f"|incremental - dense|: 0..{top:.2g} -> black..white" if top > 0
             else "|incremental - dense| = 0 everywhere")
    return label, np.repeat(grey[..., None], 3, axis=2)


def save_panels(path: Path, panels: list[tuple[str, np.ndarray]], columns: int = 3) -> tuple[int, int]:
    """Labelled panels in a grid of ``columns``; returns the picture's (width, height)."""
    pad, label_h = 8, 20
    h, w = panels[0][1].shape[:2]
    rows = math.ceil(len(panels) / columns)
    grid = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + label_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (label, rgb) in enumerate(panels):
        left, top = pad + (i % columns) * (w + pad), pad + (i // columns) * (h + label_h + pad)
        draw.text((left, top + 3), label, fill=(0, 0, 0))
        grid.paste(Image.fromarray(rgb), (left, top + label_h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, format="PNG")
    return grid.size


def _median_range(times: list[float]) -> str:
    return f"{statistics.median(times):.1f} ms [{min(times):.1f}, {max(times):.1f}]"


def run_landscape_demo(out_path: Union[str, Path], policy: str = "exact", edit_fraction: float = 0.02,
                       brush_class: str = "water", threads: int = 2, repeats: int = 5, seed: int = NOISE_SEED) -> dict:
    """Paint a stroke onto the default landscape; see the module docstring."""
    from sigec.models import load
    from sigec.models.landscape import CLASSES, colorize, default_scene, noise_map, one_hot, picture_pixels

    if brush_class not in CLASSES:
        raise ValueError(f"unknown class {brush_class!r}; choose from {CLASSES}")
    out_path = Path(out_path)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = load(LANDSCAPE).model
        labels = default_scene(HEIGHT, WIDTH)
        noise = noise_map(HEIGHT, WIDTH, seed)
        points, radius = wavy_stroke(HEIGHT, WIDTH, edit_fraction)
        stroke = brush_stroke_mask(points, radius, HEIGHT, WIDTH)
        edited_labels = labels.clone()
        edited_labels[stroke] = CLASSES.index(brush_class)
        changed = edited_labels != labels
        x, x_edit = one_hot(labels), one_hot(edited_labels)

        log.info("compiling the landscape generator with policy %r", policy)
        engine = sigec.compile(model, (x, noise), policy=policy)
        with torch.no_grad():
            original = engine(x, noise)                       # records the original
            # a stroke elsewhere first, so the timed first call pays what every new stroke pays and
            # not the engine's one-time start-up
            warm_labels = labels.clone()
            warm_labels[brush_stroke_mask([(0.2 * WIDTH, 0.3 * HEIGHT)], 6.0, HEIGHT, WIDTH)] = 0
            engine(one_hot(warm_labels), noise)
            engine(x, noise)                                  # back to the original
            start = time.perf_counter()
            y_first = engine(x_edit, noise)                   # the stroke's first call
            first_ms = (time.perf_counter() - start) * 1e3
            out = {}
            incr_times = time_ms(lambda: out.__setitem__("incr", engine(x_edit, noise)), repeats, 1, "incremental")
            recomputed = output_block_mask(engine.last_stats, (HEIGHT, WIDTH))
            report = engine.report()
            dense_times = time_ms(lambda: out.__setitem__("dense", model(x_edit, noise)), repeats, 1, "dense")
            model_cl = model.to(memory_format=torch.channels_last)
            x_cl, noise_cl = x_edit.to(memory_format=torch.channels_last), noise.to(memory_format=torch.channels_last)
            dense_cl_times = time_ms(lambda: model_cl(x_cl, noise_cl), repeats, 1, "dense channels-last")
            model.to(memory_format=torch.contiguous_format)
    finally:
        torch.set_num_threads(previous_threads)

    y_dense, y_incr = out["dense"], out["incr"]
    if not torch.equal(y_first, y_incr):
        raise AssertionError("the stroke's first and repeated incremental calls differ")
    dense_ms, dense_cl_ms = statistics.median(dense_times), statistics.median(dense_cl_times)
    baseline = "channels-last" if dense_cl_ms < dense_ms else "contiguous"
    best_dense = min(dense_ms, dense_cl_ms)
    incr_ms = statistics.median(incr_times)
    diff_label, diff_panel = _difference(y_incr, y_dense)
    stroke_rgb = _outlined(colorize(edited_labels).numpy(), stroke)
    size = save_panels(out_path, [
        ("label map", colorize(labels).numpy()),
        (f"+ {brush_class} stroke ({float(stroke.float().mean()):.1%} of pixels)", stroke_rgb),
        (f"recomputed ({float(recomputed.float().mean()):.1%}), over the original",
         _tinted(picture_pixels(original).numpy(), recomputed)),
        (f"dense ({best_dense:.0f} ms)", picture_pixels(y_dense).numpy()),
        (f"incremental, {policy} ({incr_ms:.0f} ms, {best_dense / incr_ms:.1f}x)", picture_pixels(y_incr).numpy()),
        (diff_label, diff_panel),
    ])
    results = {
        "model": LANDSCAPE, "policy": policy, "threads": threads, "repeats": repeats, "seed": seed,
        "brush_class": brush_class, "stroke_fraction": float(stroke.float().mean()),
        "edited_fraction": float(changed.float().mean()), "recomputed_fraction": float(recomputed.float().mean()),
        "dense_ms": dense_ms, "dense_ms_min": min(dense_times), "dense_ms_max": max(dense_times),
        "dense_channels_last_ms": dense_cl_ms, "dense_channels_last_ms_min": min(dense_cl_times),
        "dense_channels_last_ms_max": max(dense_cl_times), "dense_baseline": baseline,
        "incremental_ms": incr_ms, "incremental_ms_min": min(incr_times), "incremental_ms_max": max(incr_times),
        "first_call_ms": first_ms, "speedup": best_dense / incr_ms, "first_call_speedup": best_dense / first_ms,
        "dense_macs": report.dense_macs, "incremental_macs": report.incremental_macs,
        "mac_reduction": report.dense_macs / report.incremental_macs if report.incremental_macs else math.inf,
        "psnr_db": psnr(y_incr, y_dense), "max_abs_diff": float((y_incr - y_dense).abs().max()),
        "out_path": str(out_path), "image_size": size,
    }
    print(format_landscape_table(results, dense_times, dense_cl_times, incr_times))
    return results


def format_landscape_table(r: dict, dense_times: list, dense_cl_times: list, incr_times: list) -> str:
    rows = [
        ("model", f"{r['model']} ({HEIGHT}x{WIDTH}), policy {r['policy']}, {r['threads']} threads, "
                  f"{r['repeats']} repeats"),
        ("edit", f"a {r['brush_class']} brush stroke over {r['stroke_fraction']:.1%} of the pixels "
                 f"({r['edited_fraction']:.1%} changed class)"),
        ("dense latency", f"{_median_range(dense_times)} (contiguous), "
                          f"{_median_range(dense_cl_times)} (channels-last)"),
        ("incr. latency", f"{_median_range(incr_times)} (repeated), {r['first_call_ms']:.1f} ms (first call of "
                          "the stroke)"),
        ("speedup", f"{r['speedup']:.2f}x (first call {r['first_call_speedup']:.2f}x) over the faster dense "
                    f"({r['dense_baseline']})"),
        ("GMACs", f"dense {r['dense_macs'] / 1e9:.2f}, incremental {r['incremental_macs'] / 1e9:.2f} "
                  f"({r['mac_reduction']:.1f}x fewer)"),
        ("recomputed", f"{r['recomputed_fraction']:.1%} of the output pixels"),
        ("PSNR (incr. vs dense)", f"{r['psnr_db']:.1f} dB (max |diff| {r['max_abs_diff']:.2g})"),
        ("image", r["out_path"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
