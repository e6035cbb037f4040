"""Decide for every node: sparse, dense, fallback or static.

Writes ``DECISION``. Nodes independent of the edit are STATIC. Nodes without a rule are FALLBACK.
A local op goes sparse when the cost model says so: the plan's own mask expressions are evaluated
on a centred square edit of the area the settings plan for (``expected_active_fraction``), which
gives the fraction of blocks each value really activates (receptive-field growth under
``exact``, dilation under ``sige``), and the model compares

    dense  = MACs + bytes(output)
    sparse = touched * (MACs + bytes(output)) + touched * bytes(input windows, halo included)

in MAC-equivalent units (``BYTE_COST`` MACs per element moved). A per-pixel op goes sparse when
one of its image operands is produced sparse (its blocks are already there), and dense
otherwise, so no gather is added just to save an elementwise pass. Projections follow their source.
"""
from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

from sigec import meta_keys as K
from sigec.macs import node_macs
from sigec.passes.op_table import OpKind
from sigec.passes.pass_base import PassContext, sigec_pass
from sigec.plan import Decision, DecisionKind, SpatialKind
from sigec.runtime.masks import active_blocks, evaluate_masks, grid_shape

#: MAC-equivalents per element read or written by a gather or scatter.
BYTE_COST = 4.0


def representative_mask(res: tuple[int, int], area_fraction: float) -> torch.Tensor:
    """A centred square edit covering ``area_fraction`` of the image: what the cost model plans for."""
    h, w = res
    side_h = max(1, round(math.sqrt(area_fraction) * h))
    side_w = max(1, round(math.sqrt(area_fraction) * w))
    mask = torch.zeros(h, w, dtype=torch.bool)
    top, left = (h - side_h) // 2, (w - side_w) // 2
    mask[top:top + side_h, left:left + side_w] = True
    return mask


def touched_fraction(masks: dict, mask_expr, res: tuple[int, int], block: tuple[int, int]) -> float:
    """Fraction of the grid's blocks that the planned edit activates for this value."""
    gh, gw = grid_shape(res, block)
    return int(active_blocks(masks[mask_expr], block).shape[0]) / (gh * gw)


def _numel(node: Node) -> int:
    v = node.meta.get("val")
    return int(v.numel()) if hasattr(v, "numel") else 0


def _sparse_pays(node: Node, masks: dict) -> tuple[bool, str]:
    info = node.meta[K.SPATIAL]
    spec = node.meta[K.WINDOW]
    touched = touched_fraction(masks, node.meta[K.MASK], info.resolution, spec.block)
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
    # sigec.compile runs this pass once per planned edit area, with that one area in the settings;
    # run on its own (tests, dump) with several, it plans for the smallest
    planned = representative_mask(ctx.input_resolution, ctx.settings.planned_fractions[0])
    exprs = [n.meta[K.MASK] for n in gm.graph.nodes if n.meta.get(K.WINDOW) is not None]
    masks = evaluate_masks(exprs, planned)
    for node in gm.graph.nodes:
        info = node.meta[K.SPATIAL]
        rule = node.meta.get(K.RULE)
        if not info.tainted:
            decision = Decision(DecisionKind.STATIC, "does not depend on the edit")
        elif node.op in ("placeholder", "get_attr", "output"):
            decision = Decision(DecisionKind.DENSE, "graph input" if node.op == "placeholder" else node.op)
        elif rule is None:
            decision = Decision(DecisionKind.FALLBACK, ctx.fallbacks.get(node.name, "output is not image-like"))
        elif rule.kind is OpKind.IGNORED:
            decision = Decision(DecisionKind.STATIC, "assertion")
        elif rule.kind is OpKind.PROJECTION:
            decision = node.args[0].meta[K.DECISION]
        elif rule.kind is OpKind.LOCAL:
            pays, why = _sparse_pays(node, masks)
            decision = Decision(DecisionKind.SPARSE if pays else DecisionKind.DENSE, why)
        else:
            producers = [n for n in node.all_input_nodes if n.meta[K.SPATIAL].kind is SpatialKind.IMAGE]
            if any(n.meta[K.DECISION].kind is DecisionKind.SPARSE for n in producers):
                decision = Decision(DecisionKind.SPARSE, "an operand is already in blocks")
            else:
                decision = Decision(DecisionKind.DENSE, "no operand is in blocks")
        node.meta[K.DECISION] = decision
    return gm
