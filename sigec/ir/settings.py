"""Compilation settings: one frozen dataclass, validated once."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

if TYPE_CHECKING:
    from sigec.ir.costs import KernelCosts

POLICIES = ("sige", "exact")
# the planned edit area up to which a plan takes the finer automatic blocks (``block_for``)
SMALL_EDIT = 0.02
BlockSize = Union[None, int, Mapping[int, int]]


@dataclasses.dataclass(frozen=True)
class CompileSettings:
    """Everything the passes, codegen and the engine read.

    Args:
        policy: ``"sige"`` (the paper's approximation: one mask per resolution, area-resampled from
            the input mask, thresholded and dilated) or ``"exact"`` (masks grow by each operator's receptive
            field, so purely local networks reproduce the dense output).
        eps: a pixel counts as edited when its largest absolute difference over batch and channels
            exceeds ``eps``.
        dilation: pixels by which the ``sige`` per-resolution masks are dilated.
        threshold: a down-sampled ``sige`` mask pixel is active when the fraction of it the edit
            covers exceeds this (0: any overlap).
        block_size: output block edge; ``None`` picks one per resolution (finer in the plan for edits
            of at most ``SMALL_EDIT``), an int fixes it, a mapping ``{resolution: size}`` sets it per
            resolution (keyed by the height). An up-sampling's own blocks are raised to its factor.
        expected_active_fraction: the edit area (fraction of the image) the cost model plans for
            when choosing sparse or dense per node. A sequence compiles one plan per value, and each
            call runs the plan made for the area nearest to its own edit (so small edits run their
            low-resolution layers sparse too, and large ones keep them dense).
        spatial_inputs: names of the flat inputs that are images; ``None`` means every 4-D floating
            input with height and width above 1.
        kernel_costs: the ``sigec.ir.costs.KernelCosts`` the cost model prices sparse and dense with;
            ``None`` means this machine's, measured once per device and dtype and cached.
    """

    policy: str = "sige"
    eps: float = 1e-6
    dilation: int = 1
    threshold: float = 0.0
    block_size: BlockSize = None
    expected_active_fraction: Union[float, Sequence[float]] = (0.01, 0.05, 0.2)
    spatial_inputs: Optional[Sequence[str]] = None
    kernel_costs: Optional["KernelCosts"] = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        if self.dilation < 0:
            raise ValueError(f"dilation must be >= 0, got {self.dilation}")
        fractions = self.planned_fractions
        if not fractions or not all(0.0 < f <= 1.0 for f in fractions):
            raise ValueError(f"expected_active_fraction must be a fraction in (0, 1] or a sequence of them, "
                             f"got {self.expected_active_fraction!r}")
        from sigec.ir.costs import KernelCosts

        if self.kernel_costs is not None and not isinstance(self.kernel_costs, KernelCosts):
            raise TypeError(f"kernel_costs must be a sigec.ir.costs.KernelCosts or None, got "
                            f"{type(self.kernel_costs).__name__}")
        bs = self.block_size
        if isinstance(bs, int) and bs < 1:
            raise ValueError(f"block_size must be >= 1, got {bs}")
        if isinstance(bs, Mapping) and any(int(v) < 1 for v in bs.values()):
            raise ValueError(f"every block size must be >= 1, got {dict(bs)}")

    @property
    def planned_fractions(self) -> tuple[float, ...]:
        """The edit areas to compile a plan for, ascending."""
        f = self.expected_active_fraction
        values = (f,) if isinstance(f, (int, float)) else tuple(f)
        return tuple(sorted(float(v) for v in values))

    def for_plan(self, fraction: float) -> "CompileSettings":
        """These settings for the one plan made for an edit of ``fraction`` of the image."""
        return dataclasses.replace(self, expected_active_fraction=float(fraction))

    def block_for(self, height: int, width: int) -> tuple[int, int]:
        """Output block size at a resolution: powers of two keep nearest up-sampling aligned."""
        bs = self.block_size
        if isinstance(bs, int):
            return (min(bs, height), min(bs, width))
        if isinstance(bs, Mapping) and height in bs:
            edge = int(bs[height])
            return (min(edge, height), min(edge, width))
        edge = _default_block(height, width, fine=self._plans_small_edits)
        return (min(edge, height), min(edge, width))

    @property
    def _plans_small_edits(self) -> bool:
        """Whether these are the settings of one plan, made for edits of at most SMALL_EDIT."""
        f = self.expected_active_fraction
        return isinstance(f, (int, float)) and f <= SMALL_EDIT


def _default_block(height: int, width: int, fine: bool) -> int:
    # a sixteenth of the side (a 32nd in the plan for small edits), from 1 to 8 pixels. Low
    # resolutions carry the widest layers, whose matrix products cost in proportion to the pixels
    # computed: 1-pixel blocks there compute only those the edit reaches. At high resolutions
    # 8-pixel blocks fit an edit more tightly than 16 for a (10/8)^2 halo. The thin regions of a
    # small edit (a brush stroke) waste most in halos and block padding, hence the finer grid.
    # (Measured on church-256, GauGAN and the SD 1.x UNet, 1.2% to 30% edits.)
    target = max(1, min(8, min(height, width) // (32 if fine else 16)))
    edge = 1
    while edge * 2 <= target:
        edge *= 2
    return edge
