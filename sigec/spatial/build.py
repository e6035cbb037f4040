"""Build a spatial (edit-incremental) engine from a captured program: one analysis and one
incremental graph per planned edit area, one recording graph for all of them."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from sigec.core.capture import Captured, copy_graph_module
from sigec.core.codegen import emit_incremental, emit_recording
from sigec.core.engine import Engine, Plan
from sigec.core.pipeline import Program
from sigec.ir.settings import CompileSettings
from sigec.passes import ANALYSIS_PASSES, INCREMENTAL_PASSES, PassContext, run_passes
from sigec.runtime.cache import SlotStore

def plan_for(captured: torch.fx.GraphModule, settings: CompileSettings,
             cache_dtype: Optional[torch.dtype] = None) -> Plan:
    """Analyse a copy of the captured graph for one planned edit area and emit its incremental graph."""
    gm = copy_graph_module(captured)
    ctx = PassContext(settings)
    gm = run_passes(gm, ctx, ANALYSIS_PASSES)
    incremental, signature = emit_incremental(gm, ctx.batch, cache_dtype=cache_dtype)
    ctx.dense_graph = gm
    incremental = run_passes(incremental, ctx, INCREMENTAL_PASSES)
    return Plan(settings.expected_active_fraction, gm, ctx, incremental, signature)


def build_engine(captured: Captured, settings: CompileSettings, *, cache_budget_bytes: Optional[int] = None,
                 on_cache_full: str = "evict", on_stale: str = "rerecord", cache_dtype: Optional[torch.dtype] = None,
                 source: Optional[torch.nn.Module] = None) -> Engine:
    """The engine of a captured graph: a plan per planned edit area, the recording graph, the slot store."""
    plans = [plan_for(captured.gm, settings.for_plan(f), cache_dtype) for f in settings.planned_fractions]
    cache_keys = list(dict.fromkeys(key for plan in plans for key in plan.signature.caches))
    recording = emit_recording(plans[0].graph_module, cache_keys)
    store = SlotStore(cache_budget_bytes, on_cache_full)
    return Engine(plans, recording, cache_keys, captured.in_spec, captured.out_spec, captured.input_names, store,
                  source=source, on_stale=on_stale, cache_dtype=cache_dtype)


@dataclasses.dataclass(frozen=True)
class SpatialMode:
    """``sigec.compile``'s default mode; the options are ``sigec.compile``'s."""

    settings: CompileSettings
    cache_budget_bytes: Optional[int] = None
    on_cache_full: str = "evict"
    on_stale: str = "rerecord"
    cache_dtype: Optional[torch.dtype] = None

    input_error = ValueError
    takes_edit_mask = True

    def build(self, program: Program) -> Engine:
        return build_engine(program.captured, self.settings, cache_budget_bytes=self.cache_budget_bytes,
                            on_cache_full=self.on_cache_full, on_stale=self.on_stale, cache_dtype=self.cache_dtype,
                            source=program.source)
