"""Attention over image tokens, as ``torch.library`` custom ops (namespace ``sigec``).

``passes/canonicalize_tokens.py`` rewrites every attention it recognises in a captured graph
(``scaled_dot_product_attention`` with its head split and merge, or ``softmax(bmm(q, k) * s) @ v``
written by hand) into one ``sigec.attention`` call whose query is the 4-D image-shaped view of the
tokens. That makes the query side of attention per-pixel, so the block machinery can run it on
the active blocks only (``sigec.attention_blocks``), while keys and values are read whole. The
active queries go through ``sigec.attend`` (tokens ``(N, L, C)``; native on the CPU in fp32); the
dense ``sigec.attention`` runs the library's kernel, as the captured model does.

Conventions, shared by both ops:

* ``q``: ``(N, *positions, C)``; the positions (for example ``H, W``) are flattened row-major
  into tokens, so an ``(N, H, W, C)`` query is the token tensor ``(N, H*W, C)``.
* ``k``, ``v``: ``(N, *positions, C)`` and ``(N, *positions, Cv)`` with the same positions; the
  key positions may differ from the query's (cross-attention reads text tokens).
* ``heads`` splits the channels as ``C = heads * d`` (``Cv = heads * dv``), as diffusers does;
  ``scale`` multiplies the scores (``None``: ``1 / sqrt(d)``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula


def _tokens(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _split_heads(t: Tensor, heads: int) -> Tensor:
    n, length, c = t.shape
    return t.view(n, length, heads, c // heads).transpose(1, 2)


def attend_reference(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: Optional[float]) -> Tensor:
    """Token attention: ``q (N, L, C)``, ``k (N, S, C)``, ``v (N, S, Cv)`` -> ``(N, L, Cv)``, contiguous."""
    out = F.scaled_dot_product_attention(_split_heads(q, heads), _split_heads(k, heads),
                                         _split_heads(v, heads), scale=scale)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], v.shape[-1]).contiguous()


# the token attention of the active queries (``attention_blocks``); its CPU fp32 kernel is native
# (csrc/cpu_kernels.cpp). The dense ``attention`` keeps the library's kernel, as the captured model
# runs it: a recording then reproduces the model's output bit for bit.
attend = torch.library.custom_op("sigec::attend", mutates_args=())(attend_reference)


@attend.register_fake
def _(q, k, v, heads, scale):
    return q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))


def _check(op: str, q: Tensor, k: Tensor, v: Tensor, heads: int) -> None:
    if q.shape[-1] % heads or v.shape[-1] % heads:
        raise ValueError(f"sigec.{op}: channels {q.shape[-1]} (queries) and {v.shape[-1]} (values) must be "
                         f"divisible by heads={heads}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"sigec.{op}: keys have {k.shape[-1]} channels but queries {q.shape[-1]}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"sigec.{op}: keys {tuple(k.shape)} and values {tuple(v.shape)} must have the same "
                         "positions")


@torch.library.custom_op("sigec::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: Optional[float]) -> Tensor:
    """Multi-head attention of every query position over every key position: ``(N, *q positions, Cv)``."""
    _check("attention", q, k, v, heads)
    out = attend_reference(_tokens(q), _tokens(k), _tokens(v), heads, scale)
    return out.reshape(*q.shape[:-1], v.shape[-1]).contiguous()


@attention.register_fake
def _(q, k, v, heads, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("sigec::attention_blocks", mutates_args=())
def attention_blocks(q_blocks: Tensor, k: Tensor, v: Tensor, heads: int, scale: Optional[float]) -> Tensor:
    """``sigec.attention`` for the queries of the active blocks only.

    ``q_blocks`` is ``(nb * N, bh, bw, C)`` in the block-major order of ``sigec.gather`` (block
    ``b`` of sample ``n`` at row ``b * N + n``); ``k`` and ``v`` are the whole key and value
    tensors ``(N, *positions, C)``. Returns ``(nb * N, bh, bw, Cv)`` in the same order.
    """
    _check("attention_blocks", q_blocks, k, v, heads)
    n = k.shape[0]
    rows, bh, bw, c = q_blocks.shape
    # (nb, N, bh*bw, C) -> per sample, the queries of all its active blocks
    q = q_blocks.reshape(rows // n, n, bh * bw, c).transpose(0, 1).reshape(n, -1, c)
    out = torch.ops.sigec.attend(q, _tokens(k), _tokens(v), heads, scale)
    cv = v.shape[-1]
    return out.reshape(n, rows // n, bh * bw, cv).transpose(0, 1).reshape(rows, bh, bw, cv).contiguous()


@attention_blocks.register_fake
def _(q_blocks, k, v, heads, scale):
    return q_blocks.new_empty((*q_blocks.shape[:-1], v.shape[-1]))


def attention_macs(q_shape, k_shape, v_shape) -> int:
    """Multiply-accumulates of attention: every query against every key, then the values."""
    queries = 1
    for d in q_shape[:-1]:
        queries *= int(d)
    keys = 1
    for d in k_shape[1:-1]:
        keys *= int(d)
    return queries * keys * (int(q_shape[-1]) + int(v_shape[-1]))


@register_flop_formula([torch.ops.sigec.attention, torch.ops.sigec.attention_blocks, torch.ops.sigec.attend])
def _attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """What ``torch.utils.flop_counter.FlopCounterMode`` counts for these ops (two FLOPs per MAC)."""
    return 2 * attention_macs(q_shape, k_shape, v_shape)


#: The pure-PyTorch kernel of each op here that has a native one (csrc/cpu_kernels.cpp).
REFERENCE_KERNELS = {"attend": attend_reference}

ALL_OPS = {
    "attend": torch.ops.sigec.attend.default,
    "attention": torch.ops.sigec.attention.default,
    "attention_blocks": torch.ops.sigec.attention_blocks.default,
}
