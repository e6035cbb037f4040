"""Decide for every node: sparse, dense, fallback or static.

Writes ``DECISION``. Nodes independent of the edit are STATIC. Nodes without a rule are FALLBACK.
A local op goes sparse when the cost model says so: with the edit area the settings plan for
(``expected_active_fraction``), estimate the fraction of blocks an edit of that area touches on
this grid, and compare

    dense  = MACs + bytes(output)
    sparse = touched * (MACs + bytes(output)) + touched * bytes(input windows, halo included)

in MAC-equivalent units (``BYTE_COST`` MACs per element moved). A per-pixel op goes sparse when
one of its image operands is produced sparse (its blocks are already there), and dense
otherwise, so no gather is added just to save an elementwise pass. Projections follow their source.
"""
from __future__ import annotations

import math

from torch.fx import GraphModule, Node

from sigec import meta_keys as K
from sigec.macs import node_macs
from sigec.passes.op_table import OpKind
from sigec.passes.pass_base import PassContext, sigec_pass
from sigec.plan import Decision, DecisionKind, SpatialKind
from sigec.runtime.masks import grid_shape

#: MAC-equivalents per element read or written by a gather or scatter.
BYTE_COST = 4.0


def touched_fraction(res: tuple[int, int], block: tuple[int, int], area_fraction: float) -> float:
    """Fraction of blocks a square edit of ``area_fraction`` of the image touches on this grid."""
    gh, gw = grid_shape(res, block)
    side_h = math.sqrt(area_fraction) * res[0]
    side_w = math.sqrt(area_fraction) * res[1]
    rows = min(gh, math.ceil(side_h / block[0]) + 1)
    cols = min(gw, math.ceil(side_w / block[1]) + 1)
    return rows * cols / (gh * gw)


def _numel(node: Node) -> int:
    v = node.meta.get("val")
    return int(v.numel()) if hasattr(v, "numel") else 0


def _sparse_pays(node: Node, ctx: PassContext) -> tuple[bool, str]:
    info = node.meta[K.SPATIAL]
    spec = node.meta[K.WINDOW]
    touched = touched_fraction(info.resolution, spec.block, ctx.settings.expected_active_fraction)
    out_elems = _numel(node)
    macs = node_macs(node)
    gh, gw = grid_shape(info.resolution, spec.block)
    src = node.args[0].meta["val"]
    window_elems = gh * gw * src.shape[0] * src.shape[1] * spec.window[0] * spec.window[1]
    dense = macs + BYTE_COST * out_elems
    sparse = touched * (macs + BYTE_COST * out_elems + BYTE_COST * window_elems)
    why = f"est. {touched:.0%} of blocks touched: sparse {sparse:.3g} vs dense {dense:.3g}"
    return sparse < dense, why


@sigec_pass(requires=(K.SPATIAL, K.RULE, K.MASK, K.GRID, K.WINDOW), provides=(K.DECISION,))
def partition(gm: GraphModule, ctx: PassContext) -> GraphModule:
    for node in gm.graph.nodes:
        info = node.meta[K.SPATIAL]
        rule = node.meta.get(K.RULE)
        if not info.tainted or node.op in ("placeholder", "get_attr", "output"):
            decision = Decision(DecisionKind.STATIC if not info.tainted else DecisionKind.DENSE, "input")
        elif rule is None:
            decision = Decision(DecisionKind.FALLBACK, ctx.fallbacks.get(node.name, "output is not image-like"))
        elif rule.kind is OpKind.IGNORED:
            decision = Decision(DecisionKind.STATIC, "assertion")
        elif rule.kind is OpKind.PROJECTION:
            decision = node.args[0].meta[K.DECISION]
        elif rule.kind is OpKind.LOCAL:
            pays, why = _sparse_pays(node, ctx)
            decision = Decision(DecisionKind.SPARSE if pays else DecisionKind.DENSE, why)
        else:
            producers = [n for n in node.all_input_nodes if n.meta[K.SPATIAL].kind is SpatialKind.IMAGE]
            if any(n.meta[K.DECISION].kind is DecisionKind.SPARSE for n in producers):
                decision = Decision(DecisionKind.SPARSE, "an operand is already in blocks")
            else:
                decision = Decision(DecisionKind.DENSE, "no operand is in blocks")
        node.meta[K.DECISION] = decision
    return gm
