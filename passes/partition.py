"""Decide for every node: sparse, dense, fallback or static.

Writes ``DECISION``. Nodes independent of the edit are STATIC. Nodes without a rule are FALLBACK.
A local op goes sparse when the cost model says it is faster. The plan's own mask expressions
are evaluated on a centred square edit of the area the settings plan for
(``expected_active_fraction``), which gives the fraction ``t`` of blocks each value really
activates (receptive-field growth under ``exact``, dilation under ``sige``), and the measured
kernel costs (``sigec.ir.costs``: this machine's, or ``settings.kernel_costs``) price both ways:

    dense  = call + weight bytes * dense_weight_byte + MACs * dense_mac + output * element
             [+ t * input * element when the input is produced sparse: its blocks are scattered]
    sparse = 3 calls + weight bytes * sparse_weight_byte + t * MACs * sparse_mac
             + t * (windows, halo included, + output) * element

(the three calls: gather, the op on windows, scatter; output elements count for ops without
MACs, whose dense pass is a memory pass). So a low-resolution layer goes sparse when the MACs it
saves outweigh the calls and moves it adds, whatever its resolution. A per-pixel op goes sparse
when one of its image operands is produced sparse (its blocks are already there), and dense
otherwise, so no gather is added just to save an elementwise pass. Projections follow their source.
"""
from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

from sigec.ir import meta_keys as K
from sigec.ir.costs import KernelCosts, machine_costs
from sigec.ir.macs import node_macs
from sigec.passes.op_table import OpKind
from sigec.passes.pass_base import PassContext, sigec_pass
from sigec.ir.plan import Decision, DecisionKind, SpatialKind
from sigec.runtime.masks import active_blocks, evaluate_masks, grid_shape


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


def _weight_bytes(node: Node) -> int:
    """Bytes of the op's operands that are not images (weights, biases)."""
    total = 0
    for arg in node.all_input_nodes:
        v = arg.meta.get("val")
        if arg.meta[K.SPATIAL].kind is not SpatialKind.IMAGE and isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
    return total


def estimated_seconds(node: Node, touched: float, costs: KernelCosts) -> tuple[float, float]:
    """``(sparse, dense)`` estimated seconds of a local op when ``touched`` of its blocks are active."""
    info, spec = node.meta[K.SPATIAL], node.meta[K.WINDOW]
    gh, gw = grid_shape(info.resolution, spec.block)
    src = node.args[0].meta["val"]
    window_elems = gh * gw * src.shape[0] * src.shape[1] * spec.window[0] * spec.window[1]
    out_elems, macs, weights = _numel(node), node_macs(node), _weight_bytes(node)
    dense = costs.call + weights * costs.dense_weight_byte + macs * costs.dense_mac + out_elems * costs.element
    if node.args[0].meta[K.DECISION].kind is DecisionKind.SPARSE:
        dense += touched * src.numel() * costs.element
    sparse = (3 * costs.call + weights * costs.sparse_weight_byte + touched * macs * costs.sparse_mac
              + touched * (window_elems + out_elems) * costs.element)
    return sparse, dense


def _graph_device(gm: GraphModule) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the first floating image input: what the costs are measured on."""
    for node in gm.graph.nodes:
        v = node.meta.get("val")
        if node.op == "placeholder" and node.meta[K.SPATIAL].kind is SpatialKind.IMAGE and isinstance(v, torch.Tensor):
            return v.device, v.dtype
    return torch.device("cpu"), torch.float32


@sigec_pass(requires=(K.SPATIAL, K.RULE, K.MASK, K.GRID, K.WINDOW), provides=(K.DECISION,))
def partition(gm: GraphModule, ctx: PassContext) -> GraphModule:
    # sigec.compile runs this pass once per planned edit area, with that one area in the settings;
    # run on its own (tests, dump) with several, it plans for the smallest
    planned = representative_mask(ctx.input_resolution, ctx.settings.planned_fractions[0])
    exprs = [n.meta[K.MASK] for n in gm.graph.nodes if n.meta.get(K.WINDOW) is not None]
    masks = evaluate_masks(exprs, planned)
    costs = ctx.kernel_costs = ctx.settings.kernel_costs or machine_costs(*_graph_device(gm))
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
            touched = touched_fraction(masks, node.meta[K.MASK], info.resolution, node.meta[K.WINDOW].block)
            sparse, dense = estimated_seconds(node, touched, costs)
            why = f"est. {touched:.0%} of blocks touched: sparse {sparse * 1e3:.3g} ms vs dense {dense * 1e3:.3g} ms"
            decision = Decision(DecisionKind.SPARSE if sparse < dense else DecisionKind.DENSE, why, (sparse, dense))
        else:
            producers = [n for n in node.all_input_nodes if n.meta[K.SPATIAL].kind is SpatialKind.IMAGE]
            if any(n.meta[K.DECISION].kind is DecisionKind.SPARSE for n in producers):
                decision = Decision(DecisionKind.SPARSE, "an operand is already in blocks")
            else:
                decision = Decision(DecisionKind.DENSE, "no operand is in blocks")
        node.meta[K.DECISION] = decision
    return gm
