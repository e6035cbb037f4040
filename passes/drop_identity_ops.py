"""``x / 1``, ``x * 1`` and inference-mode dropout => ``x`` (incremental graph).

Models carry them as written (diffusers' ``output_scale_factor`` of 1, ``Dropout`` in eval mode),
and on the incremental path each one is a pass over the blocks. Dividing or multiplying by one
gives ``x`` bit for bit (NaN, infinities and signed zeros included), and ``dropout(x, p, False)``
is ``x``; adding zero is not (``-0.0 + 0`` is ``+0.0``), so it stays.

Dropped only where the result keeps ``x``'s dtype (the dense node's recorded values say so), and
where ``x`` is computed in the graph: a cached tensor may be written in place later, and the
value read before that write must not become an alias of it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx import GraphModule, Node

from sigec.ir import meta_keys as K
from sigec.passes.pass_base import PassContext, dense_nodes, finish_rewrite, sigec_pass

aten = torch.ops.aten

_BY_ONE = (aten.div.Tensor, aten.div.Scalar, aten.mul.Tensor, aten.mul.Scalar)


def _identity_operand(node: Node, by_name: dict) -> Optional[Node]:
    """The operand ``node`` returns unchanged, or ``None``."""
    if node.op != "call_function":
        return None
    if node.target == aten.dropout.default:
        x, p, train = node.args
        operand = x if (not train or p == 0) else None
    elif node.target in _BY_ONE and len(node.args) == 2 and not node.kwargs:
        x, other = node.args
        if node.target in (aten.mul.Tensor, aten.mul.Scalar) and isinstance(x, (int, float)):
            x, other = other, x
        operand = x if isinstance(other, (int, float)) and not isinstance(other, bool) and other == 1 else None
    else:
        return None
    if not isinstance(operand, Node) or operand.op != "call_function":
        return None
    origin = by_name.get(node.meta.get(K.ORIGIN))
    value = origin.meta.get("val") if origin is not None else None
    source = origin.args[0] if origin is not None and origin.args else None
    before = source.meta.get("val") if isinstance(source, Node) else None
    if not (isinstance(value, torch.Tensor) and isinstance(before, torch.Tensor) and value.dtype == before.dtype):
        return None
    return operand


@sigec_pass()
def drop_identity_ops(gm: GraphModule, ctx: PassContext) -> GraphModule:
    by_name = dense_nodes(ctx)
    dropped = 0
    for node in list(gm.graph.nodes):
        operand = _identity_operand(node, by_name)
        if operand is None:
            continue
        node.replace_all_uses_with(operand)
        gm.graph.erase_node(node)
        dropped += 1
    return finish_rewrite(gm, dropped, "dropped identity op(s)")
