"""Schedules: which steps of an ``n``-step trajectory are key steps (run in full, caching the cut
values); the others reuse the latest key step's cut values. ``Auto`` (``sigec.temporal.auto``)
measures where to put them."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from sigec.core.engine import EngineError


@dataclasses.dataclass(frozen=True)
class Uniform:
    """Every ``interval``-th step is a key step, starting with the first (DeepCache's ``uniform``)."""

    interval: int

    def __post_init__(self):
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"the reuse interval must be an integer >= 1, got {self.interval!r}")

    def key_steps(self, num_steps: Optional[int]) -> Optional[frozenset]:
        if num_steps is None:
            return None
        return frozenset(range(0, num_steps, self.interval))

    def is_key(self, step: int, num_steps: Optional[int]) -> bool:
        return step % self.interval == 0


@dataclasses.dataclass(frozen=True)
class KeySteps:
    """Explicit key steps; with ``reference_steps`` they are positions in a trajectory of that many
    steps, scaled to the trajectory at hand (step ``k`` becomes ``round(k * n / reference_steps)``)."""

    steps: tuple[int, ...]
    reference_steps: Optional[int] = None

    def __post_init__(self):
        steps = tuple(sorted(set(int(s) for s in self.steps)))
        if not steps or steps[0] != 0 or any(s < 0 for s in steps):
            raise ValueError(f"key steps must be non-negative and include step 0 (the first step has nothing to "
                             f"reuse), got {list(self.steps)}")
        object.__setattr__(self, "steps", steps)
        if self.reference_steps is not None and self.reference_steps <= steps[-1]:
            raise ValueError(f"reference_steps={self.reference_steps} must exceed the last key step {steps[-1]}")

    def key_steps(self, num_steps: Optional[int]) -> Optional[frozenset]:
        if self.reference_steps is None:
            return frozenset(s for s in self.steps if num_steps is None or s < num_steps)
        if num_steps is None:
            return None
        scale = num_steps / self.reference_steps
        return frozenset(min(int(math.floor(s * scale + 0.5)), num_steps - 1) for s in self.steps)

    def is_key(self, step: int, num_steps: Optional[int]) -> bool:
        keys = self.key_steps(num_steps)
        if keys is None:
            raise EngineError("this schedule is scaled to the trajectory's length, which is unknown: pass "
                              "scheduler= to sigec.compile, or engine.step(i, num_steps=n)")
        return step in keys
