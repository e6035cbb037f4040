"""``gather(scatter(blocks, ...), ...)`` => one ``sigec.scatter_gather`` (incremental graph).

The first plain gather (no affine, no activation) of each scatter's output is fused, so a
native kernel can write the blocks and read the next windows in one pass.

* In-place scatters (``scatter_`` into a cached tensor, read afterwards through the same cache
  input) become ``scatter_gather_``, which returns the windows; other readers keep reading the
  cache input, after the fused node.
* Copying scatters become ``scatter_gather``, and the other readers of the full tensor take
  element 0 of the fused result.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule

from sigec.ir import meta_keys as K
from sigec.passes.pass_base import PassContext, finish_rewrite, sigec_pass

sigec_ops = torch.ops.sigec


def _plain_gather(node, source) -> bool:
    return (node.op == "call_function" and node.target == sigec_ops.gather.default
            and node.args[0] is source and node.args[7] is None and node.args[9] == "none")


def _fuse_inplace(graph, scatter) -> bool:
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
    fused = 0
    graph = gm.graph
    for scatter in list(graph.nodes):
        if scatter.op == "call_function" and scatter.target == sigec_ops.scatter_.default:
            fused += _fuse_inplace(graph, scatter)
            continue
        if scatter.op != "call_function" or scatter.target != sigec_ops.scatter.default:
            continue
        gathers = [u for u in scatter.users if _plain_gather(u, scatter)]
        if not gathers:
            continue
        gather = gathers[0]
        blocks, base, indices, block = scatter.args
        _, g_idx, window, stride, offset, pad_mode, pad_value = gather.args[:7]
        # indices and window parameters are graph inputs or constants, so the fused node can
        # take the scatter's place and dominate every former user of either node.
        with graph.inserting_before(scatter.next):
            pair = graph.call_function(sigec_ops.scatter_gather.default,
                                       (blocks, base, indices, block, g_idx, window, stride, offset,
                                        pad_mode, pad_value))
            full = graph.call_function(operator.getitem, (pair, 0))
            windows = graph.call_function(operator.getitem, (pair, 1))
        for n in (pair, full, windows):
            n.meta[K.ORIGIN] = gather.meta.get(K.ORIGIN)
        gather.replace_all_uses_with(windows)
        graph.erase_node(gather)
        scatter.replace_all_uses_with(full)
        graph.erase_node(scatter)
        fused += 1
    return finish_rewrite(gm, fused, "fused scatter-gather pair(s)")
