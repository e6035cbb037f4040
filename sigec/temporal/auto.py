"""The ``"auto"`` schedule: key steps placed where reuse was measured to hurt least.

``TemporalEngine`` runs the first trajectory in full and measures ``E[k, j]`` (``Auto``'s docstring);
``step_weights`` and ``choose_key_steps`` turn the measurements into key steps.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

from sigec.core.engine import EngineError
from sigec.temporal.schedules import Uniform


@dataclasses.dataclass(frozen=True)
class Auto:
    """Key steps chosen from errors measured on a first trajectory, which runs every step in full.

    As many key steps as ``Uniform(interval)`` uses (so the same MACs), placed where reuse hurts
    least. At each step ``j`` of the calibration trajectory the partial graph also runs with the cut
    values of each of the ``window`` previous steps ``k``: ``E[k, j]``, the relative error of the
    model's output if step ``j`` reused key step ``k``, is measured, not guessed from feature change
    rates alone (the Block Caching idea, made direct). Each error is weighted by how much of the
    model's output the sampler carries into the next latent (``step_weights``), and a dynamic
    program places the key steps (``choose_key_steps``).
    """

    interval: int = 3

    def __post_init__(self):
        Uniform(self.interval)  # same validation

    def budget(self, num_steps: int) -> int:
        return len(Uniform(self.interval).key_steps(num_steps))

    @property
    def window(self) -> int:
        """How many steps back a partial step may reach for its key step (the calibration runs the
        partial graph that many times per step)."""
        return 2 * self.interval + 2


def step_weights(scheduler, timesteps: Sequence[float]) -> list[float]:
    """How strongly an error in the model's output at each of ``timesteps`` moves the next latent.

    For a sampler over ``scheduler.alphas_cumprod`` (DDIM, DDPM, PNDM, DPM-Solver, Euler: the
    deterministic update they share to first order), writing ``a`` for alpha-bar and
    ``s = sqrt((1 - a) / a)``, a noise-prediction error ``e`` at step ``j`` moves the next latent
    by ``sqrt(a[j+1]) * (s[j] - s[j+1]) * e`` (the step after the last reaches the clean sample,
    ``a = 1``). Errors at early, noisy steps move the latent far more than late ones. Without
    ``alphas_cumprod`` every step weighs 1.
    """
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        return [1.0] * len(timesteps)
    last = len(alphas) - 1
    abar = [float(alphas[min(max(int(round(float(t))), 0), last)]) for t in timesteps] + [1.0]
    ratio = [math.sqrt((1 - a) / a) if a > 0 else float("inf") for a in abar]
    return [math.sqrt(abar[j + 1]) * abs(ratio[j] - ratio[j + 1]) if math.isfinite(ratio[j]) else 1.0
            for j in range(len(timesteps))]


def choose_key_steps(stale_error: dict, num_steps: int, budget: int,
                     weights: Optional[Sequence[float]] = None) -> frozenset:
    """Key steps (``budget`` of them, step 0 included) minimising the estimated error of the result.

    ``stale_error[(k, j)]`` is the error of step ``j``'s output when it reuses key step ``k``'s cut
    values; pairs that are missing cannot be chosen. The partial steps that reuse one key step err
    the same way (the same stale features), so their weighted errors add up; the errors of different
    key steps are independent, so they add in quadrature. A placement therefore costs
    ``sum over key steps k of (sum over its partial steps j of weights[j] * stale_error[(k, j)]) ** 2``,
    and a dynamic program finds the cheapest exactly.
    """
    n = num_steps
    if budget >= n:
        return frozenset(range(n))
    w = list(weights) if weights is not None else [1.0] * n
    inf = float("inf")
    # segment[a][b]: squared error of steps a+1..b reusing a key at a
    segment = [[inf] * n for _ in range(n)]
    for a in range(n):
        total = 0.0
        segment[a][a] = 0.0
        for b in range(a + 1, n):
            total += w[b] * stale_error.get((a, b), inf)
            segment[a][b] = total * total
    # best[c][a]: cost of steps a..n-1 with a key at a and c more keys after it
    best = [[segment[a][n - 1] for a in range(n)]]
    choice: list[list[int]] = [[-1] * n]
    for c in range(1, budget):
        row, pick = [inf] * n, [-1] * n
        for a in range(n):
            for b in range(a + 1, n):
                cost = segment[a][b - 1] + best[c - 1][b]
                if cost < row[a]:
                    row[a], pick[a] = cost, b
        best.append(row)
        choice.append(pick)
    if not math.isfinite(best[budget - 1][0]):
        raise EngineError(f"no placement of {budget} key steps in {n} steps keeps every partial step within the "
                          "measured reuse window")
    keys, a = [0], 0
    for c in range(budget - 1, 0, -1):
        a = choice[c][a]
        if a < 0:
            break
        keys.append(a)
    return frozenset(keys)
