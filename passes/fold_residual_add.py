"""``add(blocks, gather(full))`` => ``sigec.residual_add(blocks, full)`` (incremental graph).

A residual connection whose skip input is a full tensor is read block by block inside the add,
without a separate windows tensor. Only plain halo-free gathers with a single user are folded.
"""
from __future__ import annotations


import torch
from torch.fx import GraphModule

from sigec.ir import meta_keys as K
from sigec.passes.pass_base import PassContext, finish_rewrite, sigec_pass

aten = torch.ops.aten
sigec_ops = torch.ops.sigec


def _block_read(node):
    """The gather's ``(full, indices, block)`` when it reads whole blocks with no halo or prologue."""
    if not (hasattr(node, "op") and node.op == "call_function" and node.target == sigec_ops.gather.default):
        return None
    full, indices, window, stride, offset, _, _, scale, _, act, _ = node.args
    if list(window) != list(stride) or list(offset) != [0, 0] or scale is not None or act != "none":
        return None
    return full, indices, list(window)


@sigec_pass()
def fold_residual_add(gm: GraphModule, ctx: PassContext) -> GraphModule:
    del ctx
    folded = 0
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.add.Tensor or node.kwargs.get("alpha", 1) != 1:
            continue
        for blocks, other in (node.args, tuple(reversed(node.args))):
            read = _block_read(other)
            if read is None or len(other.users) != 1 or not hasattr(blocks, "op"):
                continue
            full, indices, block = read
            with graph.inserting_before(node):
                new = graph.call_function(sigec_ops.residual_add.default, (blocks, full, indices, block))
            new.meta[K.ORIGIN] = node.meta.get(K.ORIGIN)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            graph.erase_node(other)
            folded += 1
            break
    return finish_rewrite(gm, folded, "folded residual add(s)")
