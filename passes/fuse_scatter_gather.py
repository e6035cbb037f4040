"""``scatter_(cache, blocks, ...)`` then ``gather(cache, ...)`` => one ``sigec.scatter_gather_``
(incremental graph).

The first plain gather (no affine, no activation) of a cache after each in-place scatter into it
is fused, so a native kernel writes the blocks and reads the next windows in one call. Other
readers keep reading the cache input, after the fused node.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from sigec.ir import meta_keys as K
from sigec.passes.pass_base import PassContext, finish_rewrite, sigec_pass

sigec_ops = torch.ops.sigec


def _plain_gather(node, source) -> bool:
    return (node.op == "call_function" and node.target == sigec_ops.gather.default
            and node.args[0] is source and node.args[7] is None and node.args[9] == "none")


def _fuse(graph, scatter) -> bool:
    base, blocks, indices, block = scatter.args
    order = {n: i for i, n in enumerate(graph.nodes)}
    later = [u for u in base.users if order[u] > order[scatter] and _plain_gather(u, base)]
    if not later:
        return False
    gather = min(later, key=order.__getitem__)
    _, g_idx, window, stride, offset, pad_mode, pad_value = gather.args[:7]
    with graph.inserting_before(scatter):
        windows = graph.call_function(sigec_ops.scatter_gather_.default,
                                      (base, blocks, indices, block, g_idx, window, stride, offset,
                                       pad_mode, pad_value))
    windows.meta[K.ORIGIN] = gather.meta.get(K.ORIGIN)
    gather.replace_all_uses_with(windows)
    graph.erase_node(gather)
    graph.erase_node(scatter)
    return True


@sigec_pass()
def fuse_scatter_gather(gm: GraphModule, ctx: PassContext) -> GraphModule:
    del ctx
    fused = sum(_fuse(gm.graph, node) for node in list(gm.graph.nodes)
                if node.op == "call_function" and node.target == sigec_ops.scatter_.default)
    return finish_rewrite(gm, fused, "fused scatter-gather pair(s)")
