"""Measuring helpers shared by the demo, the editor, ``sigec bench`` and the benchmark scripts."""
from __future__ import annotations

import math
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch
from tqdm import tqdm

from sigec.runtime import masks as M


def psnr(output: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR of ``output`` against ``reference`` in dB, with the reference's value range as peak
    (network outputs such as noise predictions have no fixed range). Identical tensors: ``inf``."""
    mse = float(((output.detach().double() - reference.detach().double()) ** 2).mean())
    peak = float(reference.max() - reference.min())
    if mse == 0.0:
        return math.inf
    if peak == 0.0:
        return -math.inf
    return 10.0 * math.log10(peak * peak / mse)


def time_ms(fn: Callable[[], object], repeats: int, warmup: int = 1, desc: Optional[str] = None) -> list[float]:
    """Milliseconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones; a progress bar
    labelled ``desc`` when stderr is a terminal."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in tqdm(range(repeats), desc=desc, leave=False, disable=desc is None or not sys.stderr.isatty()):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def summary(times: Sequence[float]) -> tuple[float, float, float]:
    """``(median, min, max)``."""
    return statistics.median(times), min(times), max(times)


def output_block_mask(stats: Optional[dict], resolution: tuple[int, int]) -> torch.Tensor:
    """The pixels of the blocks the engine's last call recomputed at ``resolution``: the union of
    the active blocks of every sparse operator whose mask has that resolution, taken from
    ``engine.last_stats`` (what the incremental graph actually ran, not recomputed from the
    stroke). Empty when the last call changed nothing."""
    h, w = resolution
    out = torch.zeros(h, w, dtype=torch.bool)
    if not stats:
        return out
    for (expr, block), indices in stats.get("blocks", {}).items():
        if tuple(getattr(expr, "res", ())) == (h, w):
            out |= M.blocks_to_pixels(indices.cpu(), tuple(block), (h, w))
    if not out.any() and stats.get("blocks"):
        # no operator at the output's resolution: show the finest resolution's blocks, resized
        finest = max(stats["blocks"], key=lambda k: k[0].res[0] * k[0].res[1])
        res = tuple(finest[0].res)
        coarse = torch.zeros(res, dtype=torch.bool)
        for (expr, block), indices in stats["blocks"].items():
            if tuple(expr.res) == res:
                coarse |= M.blocks_to_pixels(indices.cpu(), tuple(block), res)
        out = torch.nn.functional.interpolate(coarse[None, None].float(), size=(h, w), mode="nearest")[0, 0] > 0.5
    return out
