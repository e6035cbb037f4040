"""Shared helpers of the benchmarks: edit masks, image quality, timing and JSON output."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch

from sigec import edits
from sigec.measure import psnr, summary, time_ms  # noqa: F401  (psnr is re-exported)


def ellipse_mask(h: int, w: int, fraction: float) -> torch.Tensor:
    """The benchmark's edit: an off-centre ellipse (aspect 1.5) covering ``fraction`` of the image.

    Off-centre because a centred edit is the friendliest case for block grids.
    """
    return edits.ellipse_mask(h, w, fraction, centre=(0.6, 0.4), aspect=1.5)


def time_call(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, float, float]:
    """Wall-clock seconds of ``fn()``: ``(median, min, max)`` over ``repeats`` calls after ``warmup``."""
    return tuple(t / 1e3 for t in summary(time_ms(fn, repeats, warmup)))


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
