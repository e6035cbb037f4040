"""What users pass as ``temporal=``: a cut and a schedule (``DeepCache``, ``FasterDiffusion``, ``Reuse``)."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

from sigec.temporal.auto import Auto
from sigec.temporal.cuts import DeepCacheCut, EncoderCut, ModuleCut
from sigec.temporal.schedules import KeySteps, Uniform

#: FasterDiffusion's key steps for DDIM with 50 steps (Li et al., "Faster Diffusion").
FASTER_DIFFUSION_DDIM50 = (0, 1, 2, 3, 5, 10, 15, 25, 35)


def as_schedule(value: Any) -> "Uniform | KeySteps | Auto":
    if isinstance(value, (Uniform, KeySteps, Auto)):
        return value
    if isinstance(value, bool):
        raise TypeError(f"schedule must be an interval, key steps or 'auto', got {value!r}")
    if isinstance(value, int):
        return Uniform(value)
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"schedule string must be 'auto', got {value!r}")
        return Auto()
    if isinstance(value, (list, tuple, range, set, frozenset)):
        return KeySteps(tuple(value))
    raise TypeError(f"schedule must be an int interval, a sequence of key steps, 'auto' or a Uniform/KeySteps/Auto, "
                    f"got {type(value).__name__}")



@dataclasses.dataclass(frozen=True, kw_only=True)
class TemporalSpec:
    """A cut and a schedule. Options shared by every spec (keyword-only):

    Attributes:
        edits: also compile spatial engines, so that re-running a recorded trajectory with an
            edited input recomputes only the edited region (SDEdit with temporal reuse).
        batch_partial_steps: evaluate the partial steps between two key steps as one batch
            (needs a cut whose partial graph does not read the latent, and a scheduler).
    """

    edits: bool = False
    batch_partial_steps: bool = False

    def make_cut(self):
        """The cut: an object whose ``resolve(gm)`` names the cut nodes of a captured graph."""
        raise NotImplementedError

    def make_schedule(self):
        """The schedule: ``Uniform``, ``KeySteps`` or ``Auto``."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class DeepCache(TemporalSpec):
    """DeepCache (Ma et al., CVPR 2024): reuse the deep up-path feature of ``branch`` for
    ``interval - 1`` steps after each full step; equal to ``DeepCache.DeepCacheSDHelper`` with
    ``set_params(cache_interval=interval, cache_branch_id=branch)``."""

    interval: int = 3
    branch: int = 0

    def __post_init__(self):
        Uniform(self.interval)
        if not isinstance(self.branch, int) or self.branch < 0:
            raise ValueError(f"DeepCache branch must be an integer >= 0, got {self.branch!r}")

    def make_cut(self):
        return DeepCacheCut(self.branch)

    def make_schedule(self):
        return Uniform(self.interval)


@dataclasses.dataclass(frozen=True)
class FasterDiffusion(TemporalSpec):
    """FasterDiffusion (Li et al.): at key steps cache the encoder's skips and the mid-block output;
    other steps run the decoder only. ``key_steps=None`` uses the paper's DDIM-50 key steps
    (0, 1, 2, 3, 5, 10, 15, 25, 35), scaled to the trajectory's length; an explicit sequence is used
    as it is. Prior noise injection (a sampler change) is not part of it."""

    key_steps: Optional[tuple[int, ...]] = None

    def __post_init__(self):
        if self.key_steps is not None:
            object.__setattr__(self, "key_steps", tuple(self.key_steps))
            KeySteps(self.key_steps)

    def make_cut(self):
        return EncoderCut()

    def make_schedule(self):
        if self.key_steps is None:
            return KeySteps(FASTER_DIFFUSION_DDIM50, reference_steps=50)
        return KeySteps(self.key_steps)


@dataclasses.dataclass(frozen=True)
class Reuse(TemporalSpec):
    """Any cut, given by module names (``fnmatch`` patterns over the ``nn_module_stack`` names, such
    as ``"up_blocks.0"`` or ``"down_blocks.*"``), with a schedule: an int (uniform interval), a
    sequence of key steps, ``"auto"`` or a ``Uniform`` / ``KeySteps`` / ``Auto``."""

    cut: Union[str, Sequence[str]] = ()
    schedule: Any = 3

    def __post_init__(self):
        modules = (self.cut,) if isinstance(self.cut, str) else tuple(self.cut)
        if not modules or not all(isinstance(m, str) and m for m in modules):
            raise ValueError(f"cut must name at least one module, got {self.cut!r}")
        object.__setattr__(self, "cut", modules)
        object.__setattr__(self, "schedule", as_schedule(self.schedule))

    def make_cut(self):
        return ModuleCut(self.cut)

    def make_schedule(self):
        return self.schedule
