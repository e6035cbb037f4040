"""Multiply-accumulate counts from node shapes (``meta['val']``)."""
from __future__ import annotations

import math

import torch
from torch.fx import Node

from sigec.ir import meta_keys as K
from sigec.runtime.attention import attention_macs

aten = torch.ops.aten


def _shape(x) -> tuple[int, ...]:
    v = x.meta.get("val") if isinstance(x, Node) else x
    return tuple(int(d) for d in v.shape) if isinstance(v, torch.Tensor) else ()


def _conv(node: Node) -> int:
    w = _shape(node.args[1])
    return math.prod(_shape(node)) * w[1] * w[2] * w[3] if len(w) == 4 else 0


def _linear(node: Node) -> int:
    return math.prod(_shape(node)) * _shape(node.args[1])[-1]


def _matmul(node: Node) -> int:
    a = node.args[1] if node.target in (aten.addmm.default, aten.baddbmm.default) else node.args[0]
    return math.prod(_shape(node)) * _shape(a)[-1]


def _sdpa(node: Node) -> int:
    q, k, v = (_shape(a) for a in node.args[:3])
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def _attention(node: Node) -> int:
    return attention_macs(*(_shape(a) for a in node.args[:3]))


_FORMULAS = {
    aten.conv2d.default: _conv,
    aten.conv2d.padding: _conv,
    aten.convolution.default: _conv,
    aten.linear.default: _linear,
    aten.mm.default: _matmul,
    aten.bmm.default: _matmul,
    aten.matmul.default: _matmul,
    aten.addmm.default: _matmul,
    aten.baddbmm.default: _matmul,
    aten.scaled_dot_product_attention.default: _sdpa,
    torch.ops.sigec.attention.default: _attention,
    torch.ops.sigec.conv_windows.default: _conv,
    torch.ops.sigec.attention_blocks.default: _attention,
}


def node_macs(node: Node) -> int:
    """Dense MACs of one node (0 for ops without multiply-accumulates)."""
    formula = _FORMULAS.get(node.target) if node.op == "call_function" else None
    return int(formula(node)) if formula is not None else 0


def macs_per_output_pixel(node: Node) -> float:
    """MACs per output pixel (all channels and samples) of a node on an image, in its layout."""
    shape = _shape(node)
    info = node.meta.get(K.SPATIAL)
    if len(shape) != 4 or info is None or info.resolution is None:
        return 0.0
    h, w = info.spatial_shape(shape)
    return node_macs(node) / (h * w)
