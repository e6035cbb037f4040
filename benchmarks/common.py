"""Shared helpers of the benchmarks: edit masks, image quality, timing and JSON output."""
from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

#: Width / height of the edit ellipse (wider than tall, like a typical object edit).
ELLIPSE_ASPECT = 1.5


def _ellipse_pixels(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> torch.Tensor:
    """Pixels whose centres lie inside the axis-aligned ellipse ``(cy, cx, ry, rx)``."""
    ys = torch.arange(h, dtype=torch.float64)[:, None] + 0.5
    xs = torch.arange(w, dtype=torch.float64)[None, :] + 0.5
    return ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1.0


def ellipse_mask(h: int, w: int, fraction: float, seed: int = 0) -> torch.Tensor:
    """An ``h x w`` boolean mask of one axis-aligned ellipse covering ``fraction`` of the image.

    The ellipse is ``ELLIPSE_ASPECT`` times longer along the image's longer side (wider than tall
    on square images), lies fully inside the image with at
    least one pixel of margin, and sits off-centre at a position drawn from ``seed`` (a centred
    edit is the friendliest case for block grids, so the benchmark avoids it). Its size is tuned
    so that the number of covered pixels is as close as possible to ``fraction * h * w``.

    Raises:
        ValueError: if ``fraction`` is not in (0, 1) or no ellipse of that area fits.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if h > w:  # lay the long axis along the long side, where large ellipses still fit
        return ellipse_mask(w, h, fraction, seed).T.contiguous()
    target = fraction * h * w
    # Semi-axes of the continuous ellipse with the requested area: pi * rx * ry = target.
    ry0 = math.sqrt(target / (math.pi * ELLIPSE_ASPECT))
    rx0 = ELLIPSE_ASPECT * ry0
    # Room for the centre, with a little headroom because rasterization may need a larger scale.
    head = 1.05
    slack_y, slack_x = h - 2 * (ry0 * head + 1), w - 2 * (rx0 * head + 1)
    if slack_y < 0 or slack_x < 0:
        raise ValueError(f"an ellipse covering {fraction:.1%} of a {h}x{w} image with aspect "
                         f"{ELLIPSE_ASPECT} does not fit inside it")
    g = torch.Generator().manual_seed(seed)
    # Put the centre 15-40% of the free range away from the middle in both axes, side seeded.
    offsets = []
    for slack in (slack_y, slack_x):
        u = 0.15 + 0.25 * float(torch.rand((), generator=g))
        side = 1.0 if float(torch.rand((), generator=g)) < 0.5 else -1.0
        offsets.append(side * u * slack)
    cy, cx = h / 2 + offsets[0], w / 2 + offsets[1]

    # The largest scale that keeps a one-pixel margin around the ellipse.
    s_max = min((cy - 1) / ry0, (h - 1 - cy) / ry0, (cx - 1) / rx0, (w - 1 - cx) / rx0)

    def count(s: float) -> int:
        return int(_ellipse_pixels(h, w, cy, cx, s * ry0, s * rx0).sum())

    # The covered pixel count grows monotonically with the scale (ellipses of one centre are
    # nested), so bisect for the smallest scale reaching the target, then keep whichever of it
    # and the scale just below it lands closer.
    lo, hi = 0.0, s_max
    if count(hi) < target:
        lo = hi
    else:
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if count(mid) >= target:
                hi = mid
            else:
                lo = mid
    best = min((lo, hi), key=lambda s: abs(count(s) - target))
    mask = _ellipse_pixels(h, w, cy, cx, best * ry0, best * rx0)
    _verify_ellipse(mask, fraction)
    return mask


def _verify_ellipse(mask: torch.Tensor, fraction: float) -> None:
    """Check the achieved area and that the ellipse does not touch the image border."""
    h, w = mask.shape
    achieved = float(mask.float().mean())
    # Rasterization moves the count in steps of up to 4 pixels (the ellipse's symmetry), so
    # tiny masks get an absolute allowance on top of the relative one.
    tolerance = max(0.02 * fraction, 4.0 / (h * w))
    if abs(achieved - fraction) > tolerance:
        raise AssertionError(f"ellipse covers {achieved:.4%} of the image, requested {fraction:.4%}")
    if mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any():
        raise AssertionError("ellipse touches the image border")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of ``a`` against the reference ``b`` in dB, with peak ``b.max() - b.min()``.

    The peak is the reference's dynamic range because network outputs (noise predictions) have
    no fixed value range. Identical tensors give ``inf``.
    """
    a64, b64 = a.detach().double(), b.detach().double()
    mse = float(((a64 - b64) ** 2).mean())
    peak = float(b64.max() - b64.min())
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(peak * peak / mse)


def time_call(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, float, float]:
    """Wall-clock seconds of ``fn()``: ``(median, min, max)`` over ``repeats`` timed calls.

    ``warmup`` untimed calls come first (allocator and kernel selection warm-up).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), min(samples), max(samples)


def _jsonable(obj: Any) -> Any:
    """Recursively convert to JSON types; non-finite floats become ``None`` (JSON has no inf)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):  # numpy scalars
        return _jsonable(obj.item())
    return str(obj)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path``, creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")
    return path
