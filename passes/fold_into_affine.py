"""Fold a per-channel add before, and an activation after, into ``sigec.affine_act`` (incremental graph).

* ``affine_act(x + c, scale, shift, act)`` with ``c`` one value per sample and channel (a
  timestep embedding added after a convolution, ``(N, C, 1, 1)``) =>
  ``affine_act(x, scale, shift + scale * c, act)``: the add over the blocks becomes arithmetic
  on ``N x C`` numbers.
* ``act(affine_act(x, scale, shift, "none"))`` => ``affine_act(x, scale, shift, act)``: one pass
  over the blocks instead of two.

Each fold needs the folded value to have no other reader. The first changes the rounding of the
normalized value by about an ulp (``(x + c) * s`` against ``x * s + c * s``), as fusing any
multiply-add does; the second changes nothing.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx import Graph, GraphModule, Node

from sigec.ir import meta_keys as K
from sigec.passes.pass_base import PassContext, dense_nodes, finish_rewrite, sigec_pass

aten = torch.ops.aten
sigec_ops = torch.ops.sigec


def _is_call(node, target) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target == target


def _val(node, by_name: dict) -> Optional[torch.Tensor]:
    """Metadata of the full value an emitted node stands for: its own (cache inputs) or that of
    the dense node it comes from (blocks have the full value's dtype and channels)."""
    if not isinstance(node, Node):
        return None
    origin = by_name.get(node.meta.get(K.ORIGIN))
    value = node.meta.get("val", origin.meta.get("val") if origin is not None else None)
    return value if isinstance(value, torch.Tensor) else None


def _channel_operand(add: Node, by_name: dict, batch: int) -> Optional[tuple[Node, Node]]:
    """``(x, c)`` when ``add`` is ``x + c`` with ``c`` of shape ``(N, C, 1, 1)`` and ``x`` the full shape."""
    if add.kwargs or len(add.args) != 2:
        return None
    out = _val(add, by_name)
    if out is None or out.dim() != 4:
        return None
    for x, c in (add.args, tuple(reversed(add.args))):
        if _is_call(c, sigec_ops.tile_blocks.default):  # a per-sample operand repeated over the blocks
            c = c.args[0]  # (the repeat dies with the add)
        x_val, c_val = _val(x, by_name), _val(c, by_name)
        if (x_val is not None and c_val is not None and tuple(x_val.shape) == tuple(out.shape)
                and tuple(c_val.shape) == (batch, out.shape[1], 1, 1) and x_val.dtype == c_val.dtype == out.dtype):
            return x, c
    return None


def _fold_channel_add(graph: Graph, affine: Node, by_name: dict, batch: int) -> bool:
    add = affine.args[0]
    if not _is_call(add, aten.add.Tensor) or len(add.users) != 1:
        return False
    found = _channel_operand(add, by_name, batch)
    if found is None:
        return False
    x, c = found
    _, scale, shift, activation, slope = affine.args
    with graph.inserting_before(affine):
        per_channel = graph.call_function(aten.reshape.default, (c, [batch, -1]))
        moved = graph.call_function(aten.mul.Tensor, (scale, per_channel))
        new_shift = graph.call_function(aten.add.Tensor, (shift, moved))
    for n in (per_channel, moved, new_shift):
        n.meta[K.ORIGIN] = affine.meta.get(K.ORIGIN)
    affine.args = (x, scale, new_shift, activation, slope)
    operands = add.all_input_nodes
    graph.erase_node(add)
    for n in operands:
        if _is_call(n, sigec_ops.tile_blocks.default) and not n.users:
            graph.erase_node(n)
    return True


def _fold_activation(graph: Graph, affine: Node, by_name: dict) -> bool:
    if affine.args[3] != "none" or len(affine.users) != 1:
        return False
    user = next(iter(affine.users))
    origin = by_name.get(user.meta.get(K.ORIGIN))
    rule = origin.meta.get(K.RULE) if origin is not None else None
    if user.op != "call_function" or rule is None or rule.activation is None or user.args[:1] != (affine,):
        return False
    act = rule.activation(origin)
    if act is None:
        return False
    affine.args = (*affine.args[:3], *act)
    affine.meta[K.ORIGIN] = user.meta.get(K.ORIGIN)
    user.replace_all_uses_with(affine)
    graph.erase_node(user)
    return True


@sigec_pass()
def fold_into_affine(gm: GraphModule, ctx: PassContext) -> GraphModule:
    by_name = dense_nodes(ctx)
    folded = 0
    for node in list(gm.graph.nodes):
        if _is_call(node, sigec_ops.affine_act.default):
            folded += _fold_channel_add(gm.graph, node, by_name, ctx.batch)
            folded += _fold_activation(gm.graph, node, by_name)
    return finish_rewrite(gm, folded, "folded into affine_act")
