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


def brush_stroke_mask(points: "list[tuple[float, float]]", radius: float, height: int, width: int) -> torch.Tensor:
    """An ``(height, width)`` bool mask of a brush stroke: every pixel whose centre lies within
    ``radius`` of the polyline through ``points`` (``(x, y)`` in pixels; one point paints a disc).
    Points may lie outside the canvas; what falls outside is clipped."""
    if radius <= 0:
        raise ValueError(f"brush radius must be positive, got {radius}")
    if not points:
        raise ValueError("a brush stroke needs at least one point")
    mask = torch.zeros(height, width, dtype=torch.bool)
    segments = list(zip(points, points[1:])) or [(points[0], points[0])]
    for (x0, y0), (x1, y1) in segments:
        # only the segment's bounding box, grown by the radius, can be painted
        top, bottom = max(0, math.floor(min(y0, y1) - radius)), min(height, math.ceil(max(y0, y1) + radius) + 1)
        left, right = max(0, math.floor(min(x0, x1) - radius)), min(width, math.ceil(max(x0, x1) + radius) + 1)
        if top >= bottom or left >= right:
            continue
        ys, xs = torch.meshgrid(torch.arange(top, bottom, dtype=torch.float64) + 0.5,
                                torch.arange(left, right, dtype=torch.float64) + 0.5, indexing="ij")
        dx, dy = x1 - x0, y1 - y0
        length2 = dx * dx + dy * dy
        t = ((xs - x0) * dx + (ys - y0) * dy) / length2 if length2 > 0 else torch.zeros_like(xs)
        t = t.clamp(0.0, 1.0)
        near = (xs - (x0 + t * dx)) ** 2 + (ys - (y0 + t * dy)) ** 2 <= radius * radius
        mask[top:bottom, left:right] |= near
    return mask


def wavy_stroke(height: int, width: int, fraction: float, centre: tuple[float, float] = (0.5, 0.78),
                length: float = 0.45, waves: float = 1.5) -> "tuple[list[tuple[float, float]], float]":
    """A hand-drawn-looking brush stroke (a horizontal sine wave of ``length`` times the width,
    centred at ``centre`` as fractions of width and height) whose radius is chosen by bisection so
    that it covers ``fraction`` of the pixels. Returns ``(points, radius)``."""
    if not 0.0 < fraction <= 0.5:
        raise ValueError(f"stroke fraction must be in (0, 0.5], got {fraction}")
    cx, cy = centre[0] * width, centre[1] * height
    span = length * width
    points = [(cx - span / 2 + span * i / 64, cy + 0.06 * height * math.sin(2 * math.pi * waves * i / 64))
              for i in range(65)]
    target = fraction * height * width
    lo, hi = 0.5, float(max(height, width))
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if int(brush_stroke_mask(points, mid, height, width).sum()) < target:
            lo = mid
        else:
            hi = mid
    return points, hi
