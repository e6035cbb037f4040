"""Token operators for sparse attention, as ``torch.library`` custom ops (namespace ``sigec``).

Attention sees an image-like value as tokens: ``(N, L, C)`` with ``L = H * W`` in row-major pixel
order. Token-sparse attention computes queries only for the active tokens and updates the full
token tensor (keys, values) in place with them. Two ops move tokens between the full tensor and a
compact one:

* ``token_gather(x, indices)``: rows ``indices`` of ``x`` ``(N, L, C)`` -> ``(N, nt, C)``, contiguous.
* ``token_scatter_(base, tokens, indices)``: ``base[:, indices] = tokens`` in place.

``indices`` is a 1-D int64 tensor of distinct token positions in ``[0, L)``, on the tensors'
device, shared by every sample (the batch runs the union of the per-sample masks, as for blocks).
``token_indices(mask)`` makes it from an ``H x W`` boolean mask.

The functions here are the reference kernels (and the implementation on the CPU); the CUDA
kernels are in ``csrc/cuda_kernels.cu``.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _check(op: str, full: Tensor, indices: Tensor) -> None:
    if full.dim() != 3:
        raise ValueError(f"sigec.{op}: the token tensor must be 3-D (N, L, C), got shape {tuple(full.shape)}")
    if indices.dim() != 1 or indices.dtype != torch.int64:
        raise ValueError(f"sigec.{op}: indices must be a 1-D int64 tensor of token positions, got shape "
                         f"{tuple(indices.shape)} and dtype {indices.dtype}")
    if indices.device != full.device:
        raise ValueError(f"sigec.{op}: indices are on {indices.device} but the tokens on {full.device}; keep the "
                         "token indices on the tensors' device")


def token_gather_reference(x: Tensor, indices: Tensor) -> Tensor:
    """Rows ``indices`` of the token tensor ``x`` ``(N, L, C)``: ``(N, nt, C)``, contiguous."""
    _check("token_gather", x, indices)
    return x.index_select(1, indices).contiguous()


def token_scatter_inplace_reference(base: Tensor, tokens: Tensor, indices: Tensor) -> None:
    """``base[:, indices] = tokens`` in place (``tokens`` cast to ``base``'s dtype)."""
    _check("token_scatter_", base, indices)
    expected = (base.shape[0], indices.shape[0], base.shape[2])
    if tuple(tokens.shape) != expected:
        raise ValueError(f"sigec.token_scatter_: tokens must be (N, nt, C) = {expected}, got {tuple(tokens.shape)}")
    base.index_copy_(1, indices, tokens.to(base.dtype))


token_gather = torch.library.custom_op("sigec::token_gather", mutates_args=())(token_gather_reference)


@token_gather.register_fake
def _(x, indices):
    return x.new_empty((x.shape[0], indices.shape[0], x.shape[2]))


token_scatter_ = torch.library.custom_op("sigec::token_scatter_",
                                         mutates_args=("base",))(token_scatter_inplace_reference)


@token_scatter_.register_fake
def _(base, tokens, indices):
    return None


def token_indices(mask: Tensor) -> Tensor:
    """Positions ``(nt,)`` int64 of the active pixels of an ``H x W`` boolean mask, in token order.

    The count depends on the mask's contents, so this synchronizes with the device once per mask.
    """
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"token_indices takes an H x W boolean mask, got shape {tuple(mask.shape)} and "
                         f"dtype {mask.dtype}")
    return mask.reshape(-1).nonzero().squeeze(1)


#: The pure-PyTorch kernel of each token op: the oracle for the CUDA kernels, and what runs on
#: the CPU.
REFERENCE_KERNELS = {
    "token_gather": token_gather_reference,
    "token_scatter_": token_scatter_inplace_reference,
}

ALL_OPS = {
    "token_gather": torch.ops.sigec.token_gather.default,
    "token_scatter_": torch.ops.sigec.token_scatter_.default,
}
