"""Edit masks for demos, benchmarks and tests."""
from __future__ import annotations

import math

import torch


def ellipse_mask(height: int, width: int, fraction: float, centre: tuple[float, float] = (0.45, 0.58),
                 aspect: float = 1.5, angle_deg: float = 0.0) -> torch.Tensor:
    """An ``(height, width)`` bool mask of a rotated ellipse covering ``fraction`` of the pixels.

    ``centre`` is ``(x, y)`` as fractions of the width and height; ``aspect`` is the ratio of the
    long axis to the short one. The size is found by bisection on the rasterised area, so the
    covered fraction is right to a few pixels even when the border clips a large ellipse.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"edit fraction must be in (0, 1], got {fraction}")
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64) + 0.5,
                            torch.arange(width, dtype=torch.float64) + 0.5, indexing="ij")
    cx, cy = centre[0] * width, centre[1] * height
    a = math.radians(angle_deg)
    u = (xs - cx) * math.cos(a) + (ys - cy) * math.sin(a)
    v = -(xs - cx) * math.sin(a) + (ys - cy) * math.cos(a)
    radius2 = (u / aspect) ** 2 + v ** 2  # squared ellipse "radius" of every pixel centre
    target = max(1, round(fraction * height * width))
    lo, hi = 0.0, 4.0 * max(height, width)  # hi covers the whole image for any angle and aspect
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if int((radius2 <= mid * mid).sum()) < target:
            lo = mid
        else:
            hi = mid
    return radius2 <= hi * hi
