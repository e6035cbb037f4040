"""Give every value that depends on a spatial input the ``MaskExpr`` of its active region.

Writes ``MASK``. Policies:

* ``sige``: an image at resolution ``r`` gets the input mask resampled to ``r``, thresholded
  and dilated (one mask per resolution, as in the SIGE paper).
* ``exact``: masks follow each op: unions for pointwise and channel ops, receptive-field growth
  for local ops (``LocalRule.grow``), resizing for fallbacks. Ops with global statistics (NORM)
  and fallbacks are listed in ``ctx.approximations``: their result outside the mask is not the
  dense model's.

Derived (non-image) values get the union of their sources' masks so that an image computed from
them by a fallback (for example attention reshaped back) has a mask.
"""
from __future__ import annotations

from torch.fx import GraphModule, Node

from sigec.ir import meta_keys as K
from sigec.passes.op_table import OpKind
from sigec.passes.pass_base import PassContext, sigec_pass
from sigec.ir.plan import SpatialKind
from sigec.runtime import masks as M


def _source_masks(node: Node) -> list:
    return [n.meta[K.MASK] for n in node.all_input_nodes if n.meta.get(K.MASK) is not None]


def _common(masks: list, res) -> M.MaskExpr:
    return M.union([M.resize(m, res) for m in masks])


@sigec_pass(requires=(K.SPATIAL, K.RULE), provides=(K.MASK,))
def propagate_masks(gm: GraphModule, ctx: PassContext) -> GraphModule:
    settings = ctx.settings
    base = M.InputMask(ctx.input_resolution)
    for node in gm.graph.nodes:
        info = node.meta[K.SPATIAL]
        node.meta[K.MASK] = None
        if not info.tainted or node.op == "output":
            continue
        if node.op == "placeholder":
            # a spatial input smaller than the largest sees the input mask reduced to its size
            # (any covered pixel counts under ``exact``; ``sige`` resamples as at every resolution)
            res = info.resolution
            if res == base.res:
                node.meta[K.MASK] = base
            elif settings.policy == "sige":
                node.meta[K.MASK] = M.Resampled(base, res, settings.threshold, settings.dilation)
            else:
                node.meta[K.MASK] = M.resize(base, res)
            continue
        rule = node.meta.get(K.RULE)
        if info.kind is SpatialKind.DERIVED:
            sources = _source_masks(node)
            if sources:
                res = max((m.res for m in sources), key=lambda r: r[0] * r[1])
                node.meta[K.MASK] = _common(sources, res)
            continue
        if rule is not None and rule.kind is OpKind.IGNORED:
            continue
        res = info.resolution
        if settings.policy == "sige":
            node.meta[K.MASK] = M.Resampled(base, res, settings.threshold, settings.dilation)
        elif rule is not None and rule.kind is OpKind.LOCAL:
            node.meta[K.MASK] = rule.local.grow(node, node.args[0].meta[K.MASK], res)
        elif rule is not None:
            node.meta[K.MASK] = _common(_source_masks(node), res)
        else:
            node.meta[K.MASK] = _common(_source_masks(node), res)
        if rule is not None and rule.kind is OpKind.ATTENTION and any(k.meta[K.SPATIAL].tainted for k in node.args[1:3]):
            ctx.approximations[node.name] = "attention: queries outside the mask keep their recorded output"
        if rule is None or rule.kind is OpKind.NORM:
            why = "frozen normalization statistics" if rule is not None else ctx.fallbacks.get(node.name, "fallback")
            ctx.approximations[node.name] = why
    return gm
