"""Sparse runtime operators, as ``torch.library`` custom ops (namespace ``sigec``).

Each op has a pure-PyTorch implementation (this file: the reference kernels, also the fallback
when no native kernel is built) and a fake implementation, so graphs that call them survive
``torch.export``, aot_autograd and inductor.

Layout conventions shared by every op:

* A *full* tensor is ``(N, C, H, W)``.
* *Blocks* are ``(nb * N, C, bh, bw)``, block-major: rows ``b * N .. b * N + N - 1`` hold block
  ``b`` of every sample. ``indices`` is ``(nb, 2)`` int64 ``(row, col)`` of the active blocks on
  the output grid.
* A *window* is the input region an output block reads: block ``(r, c)`` reads rows
  ``r * stride[0] + offset[0] .. + window[0]`` (likewise columns). Pixels outside the tensor take
  ``pad_mode`` (``constant`` with ``pad_value``, ``replicate`` or ``reflect``).
* Blocks may run past the bottom/right edge when the block size does not divide the resolution;
  those pixels are computed but never scattered.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

ACTIVATIONS = ("none", "silu", "relu", "leaky_relu", "gelu", "gelu_tanh", "sigmoid", "tanh")


def apply_activation(x: Tensor, activation: str, slope: float) -> Tensor:
    if activation == "none":
        return x
    if activation == "silu":
        return F.silu(x)
    if activation == "relu":
        return F.relu(x)
    if activation == "leaky_relu":
        return F.leaky_relu(x, slope)
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "sigmoid":
        return torch.sigmoid(x)
    if activation == "tanh":
        return torch.tanh(x)
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def _per_block(t: Tensor, rows: int) -> Tensor:
    """Broadcast an ``(N, C)`` per-sample tensor over block-major ``rows`` (= nb * N)."""
    n = t.shape[0]
    return t.repeat(rows // n, 1) if rows != n and n > 1 else t


def _window_coords(indices: Tensor, size: int, stride: int, offset: int, column: int) -> Tensor:
    start = indices[:, column] * stride + offset
    return start[:, None] + torch.arange(size, device=indices.device)


def _resolve(coords: Tensor, limit: int, mode: str) -> tuple[Tensor, Tensor]:
    """In-range source coordinates for ``coords`` and which of them were inside the tensor."""
    inside = (coords >= 0) & (coords < limit)
    if mode == "reflect":
        period = 2 * (limit - 1) if limit > 1 else 1
        c = torch.remainder(coords, period)
        c = torch.where(c >= limit, period - c, c)
        return c.clamp(0, limit - 1), inside
    return coords.clamp(0, limit - 1), inside


# ---------------------------------------------------------------------------------------------
# gather


def gather_reference(x: Tensor, indices: Tensor, window: list[int], stride: list[int], offset: list[int],
                     pad_mode: str, pad_value: float, scale: Optional[Tensor], shift: Optional[Tensor],
                     activation: str, slope: float) -> Tensor:
    """Windows of ``x`` at the active blocks, optionally through ``act(x * scale + shift)``.

    ``scale``/``shift`` are ``(N, C)``. The affine and activation apply to pixels inside the tensor
    only; padding pixels are ``pad_value`` (constant mode), as if the padding were applied to the
    activated tensor, which is what a convolution after a normalization expects.
    """
    n, c, h, w = x.shape
    nb = indices.shape[0]
    rows, inside_r = _resolve(_window_coords(indices, window[0], stride[0], offset[0], 0), h, pad_mode)
    cols, inside_c = _resolve(_window_coords(indices, window[1], stride[1], offset[1], 1), w, pad_mode)
    # One flat index_select over H*W is far cheaper on CPU than 2-D advanced indexing.
    flat = (rows[:, :, None] * w + cols[:, None, :]).reshape(-1)
    out = x.reshape(n, c, h * w).index_select(2, flat)
    out = out.view(n, c, nb, window[0], window[1]).permute(2, 0, 1, 3, 4).reshape(nb * n, c, window[0], window[1])
    if scale is not None:
        rows_total = out.shape[0]
        out = out * _per_block(scale, rows_total)[:, :, None, None] + _per_block(shift, rows_total)[:, :, None, None]
    out = apply_activation(out, activation, slope)
    if pad_mode == "constant":
        inside = inside_r[:, :, None] & inside_c[:, None, :]  # (nb, wh, ww)
        if not bool(inside.all()):
            inside = inside.repeat_interleave(n, 0)[:, None]
            out = torch.where(inside, out, torch.full((), pad_value, dtype=out.dtype, device=out.device))
    return out.to(x.dtype).contiguous()


gather = torch.library.custom_op("sigec::gather", mutates_args=())(gather_reference)


@gather.register_fake
def _(x, indices, window, stride, offset, pad_mode, pad_value, scale, shift, activation, slope):
    nb = indices.shape[0]
    return x.new_empty((nb * x.shape[0], x.shape[1], window[0], window[1]))


def gather_cat_reference(xs: list[Tensor], indices: Tensor, window: list[int], stride: list[int],
                         offset: list[int], pad_mode: str, pad_value: float, scale: Optional[Tensor],
                         shift: Optional[Tensor], activation: str, slope: float) -> Tensor:
    """``gather`` of ``torch.cat(xs, dim=1)``, without materializing the concatenation (a skip
    connection's ``cat`` folded into the gather that reads it). ``scale``/``shift`` span every
    source's channels."""
    parts, c0 = [], 0
    for x in xs:
        c1 = c0 + x.shape[1]
        part_scale = scale[:, c0:c1] if scale is not None else None
        part_shift = shift[:, c0:c1] if shift is not None else None
        parts.append(gather_reference(x, indices, window, stride, offset, pad_mode, pad_value,
                                      part_scale, part_shift, activation, slope))
        c0 = c1
    return torch.cat(parts, dim=1)


gather_cat = torch.library.custom_op("sigec::gather_cat", mutates_args=())(gather_cat_reference)


@gather_cat.register_fake
def _(xs, indices, window, stride, offset, pad_mode, pad_value, scale, shift, activation, slope):
    nb, first = indices.shape[0], xs[0]
    channels = sum(x.shape[1] for x in xs)
    return first.new_empty((nb * first.shape[0], channels, window[0], window[1]))


# ---------------------------------------------------------------------------------------------
# scatter


def _block_pixels(indices: Tensor, block: list[int], h: int, w: int) -> tuple[Tensor, Optional[Tensor]]:
    """Flat ``H*W`` positions of the blocks' pixels, block-major, and which lie inside the tensor
    (``None`` when all do: blocks running past the bottom/right edge are dropped there)."""
    rows = _window_coords(indices, block[0], block[0], 0, 0)
    cols = _window_coords(indices, block[1], block[1], 0, 1)
    flat = (rows[:, :, None] * w + cols[:, None, :]).reshape(-1)
    inside = ((rows[:, :, None] < h) & (cols[:, None, :] < w)).reshape(-1)
    return flat, (None if bool(inside.all()) else inside)


def _write_blocks(out: Tensor, blocks: Tensor, indices: Tensor, block: list[int]) -> None:
    """Write ``blocks`` into ``out`` at the active blocks, in place.

    ``out`` is NCHW-contiguous or channels-last; either way the pixels are one flat axis of a
    view, so one ``index_copy_`` writes every block.
    """
    n, c, h, w = out.shape
    nb = indices.shape[0]
    if nb == 0:
        return
    flat, inside = _block_pixels(indices, block, h, w)
    vals = blocks.reshape(nb, n, c, block[0] * block[1]).permute(1, 2, 0, 3).reshape(n, c, -1)
    if inside is not None:
        flat, vals = flat[inside], vals[:, :, inside]
    vals = vals.to(out.dtype)
    if out.is_contiguous():
        out.view(n, c, h * w).index_copy_(2, flat, vals)
    elif out.is_contiguous(memory_format=torch.channels_last):
        out.permute(0, 2, 3, 1).view(n, h * w, c).index_copy_(1, flat, vals.transpose(1, 2))
    else:
        raise ValueError(f"sigec.scatter_ writes into NCHW-contiguous or channels-last tensors; got strides "
                         f"{out.stride()} for shape {tuple(out.shape)}")


def scatter_inplace_reference(base: Tensor, blocks: Tensor, indices: Tensor, block: list[int]) -> None:
    """Write the active blocks into ``base`` in place (a persistent working buffer: the cost is
    proportional to the active area, never to the tensor's size)."""
    _write_blocks(base, blocks, indices, block)


scatter_ = torch.library.custom_op("sigec::scatter_", mutates_args=("base",))(scatter_inplace_reference)


@scatter_.register_fake
def _(base, blocks, indices, block):
    return None


def scatter_gather_inplace_reference(base: Tensor, blocks: Tensor, indices: Tensor, block: list[int],
                                     gather_indices: Tensor, window: list[int], stride: list[int],
                                     offset: list[int], pad_mode: str, pad_value: float) -> Tensor:
    """``scatter_`` into ``base``, then the windows of the updated ``base`` at ``gather_indices``."""
    _write_blocks(base, blocks, indices, block)
    return gather_reference(base, gather_indices, window, stride, offset, pad_mode, pad_value, None, None, "none", 0.0)


scatter_gather_ = torch.library.custom_op("sigec::scatter_gather_",
                                          mutates_args=("base",))(scatter_gather_inplace_reference)


@scatter_gather_.register_fake
def _(base, blocks, indices, block, gather_indices, window, stride, offset, pad_mode, pad_value):
    nb = gather_indices.shape[0]
    return base.new_empty((nb * base.shape[0], base.shape[1], window[0], window[1]))


# ---------------------------------------------------------------------------------------------
# block-local helpers


def residual_add_reference(blocks: Tensor, residual: Tensor, indices: Tensor, block: list[int]) -> Tensor:
    """``blocks`` plus the matching blocks of the full tensor ``residual``."""
    windows = gather_reference(residual, indices, block, block, [0, 0], "constant", 0.0, None, None, "none", 0.0)
    return blocks + windows


residual_add = torch.library.custom_op("sigec::residual_add", mutates_args=())(residual_add_reference)


@residual_add.register_fake
def _(blocks, residual, indices, block):
    return torch.empty_like(blocks)


def affine_act_reference(x: Tensor, scale: Tensor, shift: Tensor, activation: str, slope: float) -> Tensor:
    """``act(x * scale + shift)`` with per-sample ``(N, C)`` parameters; ``x`` full or blocks."""
    rows = x.shape[0]
    y = x * _per_block(scale, rows)[:, :, None, None] + _per_block(shift, rows)[:, :, None, None]
    return apply_activation(y, activation, slope).to(x.dtype)


affine_act = torch.library.custom_op("sigec::affine_act", mutates_args=())(affine_act_reference)


@affine_act.register_fake
def _(x, scale, shift, activation, slope):
    return torch.empty_like(x)


@torch.library.custom_op("sigec::tile_blocks", mutates_args=())
def tile_blocks(t: Tensor, blocks: Tensor) -> Tensor:
    """Repeat a per-sample operand ``(N, ...)`` to match block-major ``blocks`` (nb * N rows)."""
    return t.repeat(blocks.shape[0] // t.shape[0], *([1] * (t.dim() - 1)))


@tile_blocks.register_fake
def _(t, blocks):
    return t.new_empty((blocks.shape[0], *t.shape[1:]))


@torch.library.custom_op("sigec::norm_affine", mutates_args=())
def norm_affine(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                eps: float) -> tuple[Tensor, Tensor]:
    """Frozen group-norm statistics as a per-sample affine: ``norm(x) == x * scale + shift``.

    Returns ``(scale, shift)``, each ``(N, C)`` in float32. Instance norm is ``num_groups == C``.
    """
    n, c = x.shape[:2]
    var, mean = torch.var_mean(x.float().reshape(n, num_groups, -1), dim=2, unbiased=False)
    rstd = torch.rsqrt(var + eps)
    per_channel = c // num_groups
    rstd = rstd.repeat_interleave(per_channel, 1)
    mean = mean.repeat_interleave(per_channel, 1)
    w = weight.float()[None] if weight is not None else torch.ones_like(rstd)
    b = bias.float()[None] if bias is not None else torch.zeros_like(rstd)
    scale = rstd * w
    return scale, b - mean * scale


@norm_affine.register_fake
def _(x, num_groups, weight, bias, eps):
    shape = (x.shape[0], x.shape[1])
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32)


#: Output positions (blocks x pixels per block) up to which ``conv_windows`` runs as one matrix
#: product: oneDNN reorders the weight on every call, which dominates with few outputs. The
#: native kernel (csrc/cpu_kernels.cpp, ``kGemmMaxOutputs``) uses the same threshold.
def dense_conv_input(x: Tensor, weight: Tensor) -> Tensor:
    """The input of a dense convolution of the incremental graph, in the layout its weight has.

    A channels-last input makes ``aten.convolution`` copy the (contiguous) weight into
    channels-last on every call: 9.4 MB for a 512-channel 3x3 convolution, which at the low
    resolutions of a UNet is many times the input (128 KB at 8x8). When the input is the smaller
    of the two, it is the one made contiguous; otherwise ``x`` is returned as it is. Nothing is
    kept between calls (no memory cost).
    """
    if (x.dim() == 4 and weight.dim() == 4 and weight.is_contiguous() and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last) and x.numel() < weight.numel()):
        return x.contiguous()
    return x


GEMM_MAX_OUTPUTS = 1024


def _conv_output_hw(windows: Tensor, weight: Tensor, stride: list[int], dilation: list[int]) -> tuple[int, int]:
    """Output size of an unpadded convolution of ``windows``."""
    return tuple((size - d * (k - 1) - 1) // s + 1
                 for size, k, s, d in zip(windows.shape[2:], weight.shape[2:], stride, dilation))


def im2col_reference(windows: Tensor, kernel: list[int], stride: list[int]) -> Tensor:
    """The ``(nb*oh*ow, C*kh*kw)`` matrix of the kernel positions of unpadded windows: rows are
    output positions (block, row, column), columns follow a weight reshaped to ``(C_out, -1)``."""
    (kh, kw), c = kernel, windows.shape[1]
    # (nb, C, oh, ow, kh, kw) views, copied once (F.unfold's im2col is an order of magnitude slower)
    patches = windows.unfold(2, kh, stride[0]).unfold(3, kw, stride[1])
    cols = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kh * kw)
    # a 1x1 kernel over channels-last windows is a view: an op's output never aliases its input
    aliased = cols.untyped_storage().data_ptr() == windows.untyped_storage().data_ptr()
    return cols.clone(memory_format=torch.contiguous_format) if aliased else cols


im2col = torch.library.custom_op("sigec::im2col", mutates_args=())(im2col_reference)


@im2col.register_fake
def _(windows, kernel, stride):
    (kh, kw), (sh, sw) = kernel, stride
    oh, ow = (windows.shape[2] - kh) // sh + 1, (windows.shape[3] - kw) // sw + 1
    return windows.new_empty((windows.shape[0] * oh * ow, windows.shape[1] * kh * kw))


def conv_windows_reference(windows: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int],
                           dilation: list[int], groups: int) -> Tensor:
    """``conv2d(windows, weight, bias, stride, padding=0, dilation, groups)`` on gathered windows,
    contiguous NCHW. With few output positions (``GEMM_MAX_OUTPUTS``) and one group it is an
    im2col matrix product against the weight as it is stored (no per-call weight reorder)."""
    nb = windows.shape[0]
    co, _, kh, kw = weight.shape
    oh, ow = _conv_output_hw(windows, weight, stride, dilation)
    if groups != 1 or list(dilation) != [1, 1] or windows.device.type != "cpu" or nb * oh * ow > GEMM_MAX_OUTPUTS:
        return F.conv2d(windows, weight, bias, stride, 0, dilation, groups).contiguous()
    cols = torch.ops.sigec.im2col(windows, [kh, kw], list(stride))
    matrix = weight.reshape(co, -1).t()
    out = torch.addmm(bias, cols, matrix) if bias is not None else cols @ matrix
    return out.view(nb, oh, ow, co).permute(0, 3, 1, 2).contiguous()


conv_windows = torch.library.custom_op("sigec::conv_windows", mutates_args=())(conv_windows_reference)


@conv_windows.register_fake
def _(windows, weight, bias, stride, dilation, groups):
    oh, ow = _conv_output_hw(windows, weight, stride, dilation)
    nb, co = windows.shape[0], weight.shape[0]
    return windows.new_empty((nb, co, oh, ow))


@register_flop_formula(torch.ops.sigec.conv_windows)
def _conv_windows_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """What ``FlopCounterMode`` counts for ``conv_windows``: two FLOPs per multiply-accumulate."""
    return 2 * math.prod(out_shape) * math.prod(w_shape[1:])



def linear_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear(x, weight, bias)``: ``x (..., K)`` times ``weight (N, K)`` transposed.

    The incremental graph's linears on the tokens of active blocks have few rows (tens to a few
    hundred) against weights of up to 52 MB; the native CPU kernel then reads the weight once, in
    the layout it is stored in, where the library GEMM packs it on every call."""
    return F.linear(x, weight, bias)


linear = torch.library.custom_op("sigec::linear", mutates_args=())(linear_reference)


@linear.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@register_flop_formula(torch.ops.sigec.linear)
def _linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """What ``FlopCounterMode`` counts for ``linear``: two FLOPs per multiply-accumulate."""
    return 2 * math.prod(out_shape) * w_shape[1]

#: The pure-PyTorch implementation of each op that has a native kernel (csrc/): the oracle the
#: native kernels are tested against, and what runs when they are not built.
REFERENCE_KERNELS = {
    "gather": gather_reference,
    "gather_cat": gather_cat_reference,
    "scatter_": scatter_inplace_reference,
    "scatter_gather_": scatter_gather_inplace_reference,
    "residual_add": residual_add_reference,
    "affine_act": affine_act_reference,
    "im2col": im2col_reference,
    "conv_windows": conv_windows_reference,
    "linear": linear_reference,
}

#: Every op of the namespace, for opcheck and completeness tests.
ALL_OPS = {
    "gather": torch.ops.sigec.gather.default,
    "gather_cat": torch.ops.sigec.gather_cat.default,
    "scatter_": torch.ops.sigec.scatter_.default,
    "scatter_gather_": torch.ops.sigec.scatter_gather_.default,
    "residual_add": torch.ops.sigec.residual_add.default,
    "affine_act": torch.ops.sigec.affine_act.default,
    "tile_blocks": torch.ops.sigec.tile_blocks.default,
    "conv_windows": torch.ops.sigec.conv_windows.default,
    "linear": torch.ops.sigec.linear.default,
    "im2col": torch.ops.sigec.im2col.default,
    "norm_affine": torch.ops.sigec.norm_affine.default,
}
