"""Fold a frozen normalization and an activation into the gather of the next local op.

Rule: ``local(act(norm(x)))``, ``local(norm(x))`` or ``local(act(x))`` with the local op sparse
=> ``local`` gathers its windows from ``x`` and evaluates ``act(x * scale + shift)`` on them
(``sigec.gather`` with scale/shift/activation), so the normalized tensor is never
materialized. ``x * sigmoid(x)`` written by hand counts as ``silu``. Writes ``PROLOGUE`` on the
local op. The intermediate nodes stay in the plan; codegen drops them when nothing else reads them.

Why values agree: outside the edited blocks the gathered ``x`` holds recorded values, and with
frozen statistics ``act(x * scale + shift)`` reproduces the recorded activation there.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from sigec.ir import meta_keys as K
from sigec.passes.op_table import OpKind
from sigec.passes.pass_base import PassContext, sigec_pass
from sigec.ir.plan import DecisionKind, GatherPrologue, SpatialKind

aten = torch.ops.aten


def _activation(node: Node) -> Optional[tuple[str, float, Node]]:
    """``(name, slope, input)`` when ``node`` is an activation sigec.gather can apply."""
    if node.op != "call_function" or node.meta[K.DECISION].kind is DecisionKind.FALLBACK:
        return None
    rule = node.meta.get(K.RULE)
    if rule is not None and rule.activation is not None:
        name, slope = rule.activation(node)
        return name, slope, node.args[0]
    if node.target == aten.mul.Tensor and len(node.args) == 2:
        a, b = node.args
        for x, s in ((a, b), (b, a)):
            if (isinstance(s, Node) and s.op == "call_function" and s.target == aten.sigmoid.default
                    and s.args[0] is x):
                return "silu", 0.0, x
    return None


def _is_norm(node) -> bool:
    rule = node.meta.get(K.RULE) if isinstance(node, Node) else None
    return rule is not None and rule.kind is OpKind.NORM


def _same_dtype(a: Node, b: Node) -> bool:
    return a.meta["val"].dtype == b.meta["val"].dtype


@sigec_pass(requires=(K.RULE, K.DECISION, K.WINDOW), provides=(K.PROLOGUE,))
def fold_norm_activation(gm: GraphModule, ctx: PassContext) -> GraphModule:
    folded = 0
    for node in gm.graph.nodes:
        node.meta[K.PROLOGUE] = None
        rule = node.meta.get(K.RULE)
        if rule is None or rule.kind is not OpKind.LOCAL or node.meta[K.DECISION].kind is not DecisionKind.SPARSE:
            continue
        src = node.args[0]
        act = _activation(src)
        activation, slope = "none", 0.0
        if act is not None:
            activation, slope, src = act
        norm = src if _is_norm(src) and src.meta[K.DECISION].kind is not DecisionKind.FALLBACK else None
        if norm is not None:
            src = norm.args[0]
        if (norm is None and act is None) or src.meta[K.SPATIAL].kind is not SpatialKind.IMAGE:
            continue
        if not _same_dtype(src, node.args[0]):
            continue  # a dtype cast sits in the chain; keep it explicit
        node.meta[K.PROLOGUE] = GatherPrologue(src, norm, activation, slope)
        folded += 1
    if folded:
        logging.getLogger("sigec.passes").debug("folded %d normalization/activation prologue(s)", folded)
    return gm
