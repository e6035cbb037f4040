"""The temporal mode: specialize the captured program at the cut of ``temporal=`` and build a
``TemporalEngine`` (with spatial engines on its two graphs for ``edits=True``)."""
from __future__ import annotations

import logging
from typing import Optional

import torch

from sigec.core.pipeline import Program, compile_in_mode
from sigec.ir.settings import CompileSettings
from sigec.passes.pass_base import run_passes
from sigec.passes.specialize_cut import CutContext, specialize_cut
from sigec.runtime.cache import SlotStore
from sigec.temporal.engine import TemporalEngine
from sigec.temporal.specs import TemporalSpec

log = logging.getLogger("sigec.temporal")


class TemporalMode:
    """``sigec.compile(..., temporal=...)``. The spatial options (``policy`` ... ``kernel_costs``)
    configure the spatial engines of ``edits=True``; ``spatial_inputs`` also names the latent inputs
    (default: every 4-D floating input). The cache options apply to the cut values."""

    input_error = ValueError
    takes_edit_mask = True

    def __init__(self, temporal: TemporalSpec, scheduler=None, *, policy: str = "sige", eps: float = 1e-6,
                 dilation: int = 1, threshold: float = 0.0, block_size=None,
                 expected_active_fraction: "float | tuple[float, ...]" = CompileSettings.expected_active_fraction,
                 spatial_inputs=None, kernel_costs=None, cache_budget_bytes: Optional[int] = None,
                 on_cache_full: str = "evict", on_stale: str = "rerecord",
                 cache_dtype: Optional[torch.dtype] = None):
        if not isinstance(temporal, TemporalSpec):
            raise TypeError(f"temporal= must be a sigec.temporal spec (DeepCache, FasterDiffusion or Reuse), got "
                            f"{type(temporal).__name__}")
        if on_stale not in ("rerecord", "raise"):
            raise ValueError(f"on_stale must be 'rerecord' or 'raise', got {on_stale!r}")
        self.temporal, self.scheduler = temporal, scheduler
        self.settings = CompileSettings(policy=policy, eps=eps, dilation=dilation, threshold=threshold,
                                        block_size=block_size, expected_active_fraction=expected_active_fraction,
                                        spatial_inputs=tuple(spatial_inputs) if spatial_inputs is not None else None,
                                        kernel_costs=kernel_costs)
        self.engine_options = dict(cache_budget_bytes=cache_budget_bytes, on_cache_full=on_cache_full,
                                   on_stale=on_stale, cache_dtype=cache_dtype)

    def build(self, program: Program) -> TemporalEngine:
        captured = program.captured
        cut = self.temporal.make_cut().resolve(captured.gm)
        ctx = CutContext(self.settings, cut=tuple(cut))
        run_passes(captured.gm, ctx, [specialize_cut])
        spec = ctx.specialization
        log.info("temporal cut %s: partial graph reads %s of the inputs %s", spec.cut, spec.reads, spec.inputs)
        options = self.engine_options
        engine = TemporalEngine(captured.gm, spec, self.temporal, self.scheduler, captured.in_spec,
                                captured.out_spec, captured.input_names, self.settings.spatial_inputs,
                                SlotStore(options["cache_budget_bytes"], options["on_cache_full"]),
                                on_stale=options["on_stale"], cache_dtype=options["cache_dtype"],
                                source=program.source)
        if self.temporal.edits:
            engine.build_spatial_engines(self.settings, options)
        return engine


def compile_temporal(model, example_args=None, example_kwargs: Optional[dict] = None, *, temporal: TemporalSpec,
                     scheduler=None, **options) -> TemporalEngine:
    """``sigec.compile(model, example_args, example_kwargs, temporal=temporal, scheduler=scheduler, **options)``."""
    return compile_in_mode(TemporalMode(temporal, scheduler, **options), model, example_args, example_kwargs)
