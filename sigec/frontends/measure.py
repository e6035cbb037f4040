"""Measuring helpers shared by the demo, ``sigec bench`` and the benchmark scripts."""
from __future__ import annotations

import math
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch
from tqdm import tqdm


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
