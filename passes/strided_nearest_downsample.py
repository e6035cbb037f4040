"""Nearest down-sampling by whole factors => a strided slice (incremental graph).

SPADE-family generators resize the label map to every layer's resolution with
``F.interpolate(seg, size=...)``. ATen's CPU ``upsample_nearest2d`` reads its whole input to
produce a tiny output (5.6 ms for a 36 x 256 x 512 label map down to 4 x 8): eleven of them were
a third of GauGAN's incremental call at a 1.3% edit. With output size ``(h, w)`` and input
``(f_h * h, f_w * w)`` nearest sampling takes input pixel ``(f_h * i, f_w * j)`` (ATen: the source
index is ``floor(i * H / h)``, exact for whole factors), so the result is
``x[..., ::f_h, ::f_w]``, copied out (``clone``) so that it never aliases a tensor the graph
writes in place later. Bit for bit the same values.

Only full-tensor calls (the emitted output size is the dense origin's) whose origin was called
with an output size (not scale factors, which ATen maps with the reciprocal of the factor) and
shrinks by whole factors. Block-wise calls resize small windows and stay as they are.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx import GraphModule, Node

from sigec.ir import meta_keys as K
from sigec.passes.pass_base import PassContext, dense_nodes, finish_rewrite, sigec_pass

aten = torch.ops.aten


def _factors(node: Node, by_name: dict) -> Optional[tuple[int, int]]:
    """Whole down-sampling factors ``(f_h, f_w)`` of a nearest resize, or ``None``."""
    if node.op != "call_function" or node.target != aten.upsample_nearest2d.vec or node.kwargs:
        return None
    origin = by_name.get(node.meta.get(K.ORIGIN))
    if origin is None or origin.target != aten.upsample_nearest2d.vec or len(node.args) < 2:
        return None
    scales = node.args[2] if len(node.args) > 2 else None
    source = origin.args[0] if origin.args else None
    before = source.meta.get("val") if isinstance(source, Node) else None
    after = origin.meta.get("val")
    if scales is not None or node.args[1] is None or not (isinstance(before, torch.Tensor)
                                                          and isinstance(after, torch.Tensor)):
        return None
    if list(node.args[1]) != list(after.shape[-2:]):  # a block-wise call: leave it
        return None
    (big_h, big_w), (small_h, small_w) = before.shape[-2:], after.shape[-2:]
    if small_h > big_h or small_w > big_w or big_h % small_h or big_w % small_w:
        return None
    factors = (big_h // small_h, big_w // small_w)
    return factors if factors != (1, 1) else None


@sigec_pass()
def strided_nearest_downsample(gm: GraphModule, ctx: PassContext) -> GraphModule:
    by_name = dense_nodes(ctx)
    rewritten = 0
    for node in list(gm.graph.nodes):
        factors = _factors(node, by_name)
        if factors is None:
            continue
        with gm.graph.inserting_before(node):
            rows = gm.graph.call_function(aten.slice.Tensor, (node.args[0], 2, 0, None, factors[0]))
            cols = gm.graph.call_function(aten.slice.Tensor, (rows, 3, 0, None, factors[1]))
            copy = gm.graph.call_function(aten.clone.default, (cols,), {"memory_format": torch.contiguous_format})
        for new in (rows, cols, copy):
            new.meta[K.ORIGIN] = node.meta.get(K.ORIGIN)
        node.replace_all_uses_with(copy)
        gm.graph.erase_node(node)
        rewritten += 1
    return finish_rewrite(gm, rewritten, "nearest down-sampling(s) as strided slices")
