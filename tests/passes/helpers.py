"""Capture small models and run the analysis pipeline up to a named pass."""
from __future__ import annotations

import torch

from sigec.core.capture import capture
from sigec.passes import ANALYSIS_PASSES, PassContext, run_passes
from sigec.passes.verifier import verify
from sigec.ir.settings import CompileSettings


def analyse(model: torch.nn.Module, args: tuple, until: str = "fold_norm_activation", **settings):
    """``(gm, ctx)`` after the analysis passes up to ``until``, with invariants verified."""
    ctx = PassContext(CompileSettings(**settings))
    gm = run_passes(capture(model.eval(), args).gm, ctx, ANALYSIS_PASSES, stop_after=until)
    verify(gm, until)
    return gm, ctx


def node(gm, name: str):
    return next(n for n in gm.graph.nodes if n.name == name)


def nodes_by_target(gm, target) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]
