"""What sigec knows about each ATen op, in one declarative table.

Kinds (``OpKind``):

* ``POINTWISE``   - output pixel depends only on the same pixel of each operand. Derived from the
  ``torch.Tag.pointwise`` schema tag, plus the few listed in ``_EXTRA_POINTWISE``.
* ``CHANNELWISE`` - output pixel depends on all channels of the same pixel (channel cat, slice,
  split, channel reductions).
* ``LOCAL``       - output block reads a fixed input window: a ``LocalRule`` gives the window
  (halo analysis), the receptive-field growth of the mask (``exact`` policy) and how to call
  the op on gathered windows.
* ``NORM``        - statistics over the whole image (group / instance norm); under every policy
  the statistics are frozen at the recorded values, so the op becomes a per-channel affine.
* ``ATTENTION``   - ``sigec.attention`` (see passes/canonicalize_tokens.py): an output pixel depends on
  the same pixel of the query and on every key and value. Queries run on the active blocks;
  keys and values are read whole (the recorded tensors with their active blocks updated).
* ``PROJECTION``  - ``getitem`` on multi-output ops; follows its source.
* ``IGNORED``     - runtime assertions that produce nothing.

Anything else on a spatial value is a fallback: it runs densely on materialized inputs and its
output is taken inside its mask. ``lookup`` never raises for unknown ops.

Every rule has a capability predicate ``supports(node) -> reason | None`` that must not modify
the node; a reason turns the node into a fallback and is shown in reports.
"""
from __future__ import annotations

import dataclasses
import enum
import operator
from typing import Callable, Optional

import torch
from torch.fx import Node

from sigec.ir import meta_keys as K
from sigec.runtime import attention as _attention  # noqa: F401  (registers torch.ops.sigec.attention)
from sigec.runtime import ops as _ops  # noqa: F401  (registers torch.ops.sigec.conv_windows)
from sigec.runtime import masks as M

aten = torch.ops.aten


class OpKind(enum.Enum):
    POINTWISE = "pointwise"
    CHANNELWISE = "channelwise"
    LOCAL = "local"
    NORM = "norm"
    ATTENTION = "attention"
    PROJECTION = "projection"
    IGNORED = "ignored"


@dataclasses.dataclass(frozen=True)
class WindowSpec:
    """Geometry of a sparse op: output block, input window, where windows start, padding, crop.

    Output block ``(r, c)`` covers output pixels ``[r*block[0], (r+1)*block[0])`` and reads input
    rows ``r*stride[0] + offset[0] ... + window[0] - 1`` (columns likewise). ``halo`` is how far
    the window reaches past the block's own footprint on the input.
    """

    block: tuple[int, int]
    window: tuple[int, int]
    stride: tuple[int, int]
    offset: tuple[int, int]
    pad_mode: str = "constant"
    pad_value: float = 0.0
    crop: tuple[int, int] = (0, 0)

    @property
    def halo(self) -> tuple[int, int]:
        return tuple(w - s for w, s in zip(self.window, self.stride))

    @property
    def is_identity(self) -> bool:
        return (self.window == self.block and self.stride == self.block and self.offset == (0, 0))


def identity_window(block: tuple[int, int]) -> WindowSpec:
    return WindowSpec(block, block, block, (0, 0))


@dataclasses.dataclass(frozen=True)
class LocalRule:
    """How a local op maps output blocks to input windows.

    ``window(node, block)`` returns a ``WindowSpec`` or a string saying why this block size cannot
    be used. ``grow(node, src)`` is the output mask under ``exact``. ``block_call(node, windows,
    spec)`` returns ``(target, args, kwargs)`` that computes the op on gathered windows.
    ``block_multiple(node)`` is what the output block's (rows, columns) must be multiples of.
    """

    window: Callable[[Node, tuple[int, int]], "WindowSpec | str"]
    grow: Callable[[Node, M.MaskExpr, tuple[int, int]], M.MaskExpr]
    block_call: Callable[[Node, object, WindowSpec], tuple]
    block_multiple: Callable[[Node], tuple[int, int]] = lambda node: (1, 1)


@dataclasses.dataclass(frozen=True)
class OpRule:
    kind: OpKind
    supports: Callable[[Node], Optional[str]] = lambda node: None
    local: Optional[LocalRule] = None
    #: for POINTWISE activations: the name ``sigec.gather`` understands, and the slope argument.
    activation: Optional[Callable[[Node], Optional[tuple[str, float]]]] = None
    #: argument positions of the spatial operand(s); ``None`` means every tensor argument.
    spatial_args: Optional[tuple[int, ...]] = None


# ---------------------------------------------------------------------------------------------
# helpers on node arguments


def arg(node: Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _pair(v, default: int = 0) -> tuple[int, int]:
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        return (default, default)
    if isinstance(v, int):
        return (v, v)
    v = list(v)
    return (int(v[0]), int(v[-1])) if len(v) in (1, 2) else (int(v[0]), int(v[1]))


def _val(node) -> Optional[torch.Tensor]:
    v = node.meta.get("val") if isinstance(node, Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _hw(node) -> tuple[int, int]:
    v = _val(node)
    return (int(v.shape[-2]), int(v.shape[-1]))


def _conv_window(block, kernel, stride, padding, dilation, pad_value=0.0) -> WindowSpec:
    window = tuple((b - 1) * s + d * (k - 1) + 1 for b, k, s, d in zip(block, kernel, stride, dilation))
    return WindowSpec(block, window, tuple(b * s for b, s in zip(block, stride)),
                      tuple(-p for p in padding), "constant", pad_value)


def _grow_window(kernel, stride, padding, dilation):
    def grow(node: Node, src: M.MaskExpr, res) -> M.MaskExpr:
        return M.Window(src, kernel(node), stride(node), padding(node), dilation(node), res)
    return grow


# ---------------------------------------------------------------------------------------------
# convolution


def _conv_params(node: Node):
    w = _val(node.args[1])
    kernel = (int(w.shape[2]), int(w.shape[3]))
    if node.target == aten.convolution.default:
        stride, padding, dilation = (_pair(node.args[i], 1 if i != 4 else 0) for i in (3, 4, 5))
        return kernel, stride, padding, dilation
    stride = _pair(arg(node, 3, "stride", 1), 1)
    dilation = _pair(arg(node, 5, "dilation", 1), 1)
    pad = arg(node, 4, "padding", 0)
    if isinstance(pad, str):
        padding = (0, 0) if pad == "valid" else tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    else:
        padding = _pair(pad)
    return kernel, stride, padding, dilation


def _conv_supports(node: Node) -> Optional[str]:
    if len(node.args) < 2 or _val(node.args[1]) is None or _val(node.args[1]).dim() != 4:
        return "not a 2-D convolution"
    if node.target == aten.convolution.default and node.args[6]:
        return "transposed convolution has no sparse rule yet"
    return None


def _conv_call(node: Node, windows, spec: WindowSpec):
    _, stride, _, dilation = _conv_params(node)
    groups = node.args[8] if node.target == aten.convolution.default else arg(node, 6, "groups", 1)
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return torch.ops.sigec.conv_windows.default, (windows, node.args[1], bias, list(stride), list(dilation), groups), {}


_CONV = LocalRule(
    window=lambda node, block: _conv_window(block, *_conv_params(node)),
    grow=_grow_window(*(lambda node, i=i: _conv_params(node)[i] for i in range(4))),
    block_call=_conv_call,
)

# ---------------------------------------------------------------------------------------------
# pooling


def _pool_params(node: Node):
    kernel = _pair(node.args[1])
    stride = _pair(arg(node, 2, "stride", None)) if arg(node, 2, "stride", None) else kernel
    padding = _pair(arg(node, 3, "padding", 0))
    dilation = _pair(arg(node, 4, "dilation", 1), 1) if node.target == aten.max_pool2d.default else (1, 1)
    return kernel, stride, padding, dilation


def _max_pool_supports(node: Node) -> Optional[str]:
    return "ceil_mode pooling has no sparse rule" if arg(node, 5, "ceil_mode", False) else None


def _avg_pool_supports(node: Node) -> Optional[str]:
    if arg(node, 4, "ceil_mode", False):
        return "ceil_mode pooling has no sparse rule"
    if not arg(node, 5, "count_include_pad", True) and any(_pair(arg(node, 3, "padding", 0))):
        return "avg_pool2d with count_include_pad=False and padding depends on the border"
    return None


_MAX_POOL = LocalRule(
    window=lambda node, block: _conv_window(block, *_pool_params(node), pad_value=float("-inf")),
    grow=_grow_window(*(lambda node, i=i: _pool_params(node)[i] for i in range(4))),
    block_call=lambda node, w, spec: (aten.max_pool2d.default,
                                      (w, list(_pool_params(node)[0]), list(_pool_params(node)[1]),
                                       [0, 0], list(_pool_params(node)[3]), False), {}),
)
_AVG_POOL = LocalRule(
    window=lambda node, block: _conv_window(block, *_pool_params(node)),
    grow=_grow_window(*(lambda node, i=i: _pool_params(node)[i] for i in range(4))),
    block_call=lambda node, w, spec: (aten.avg_pool2d.default,
                                      (w, list(_pool_params(node)[0]), list(_pool_params(node)[1]),
                                       [0, 0], False, True, arg(node, 6, "divisor_override", None)), {}),
)

# ---------------------------------------------------------------------------------------------
# resampling


def _factors(node: Node) -> tuple[tuple[int, int, bool], ...]:
    """Per dimension ``(factor, up)``: output = input * factor (up) or input / factor (down)."""
    (hi, wi), (ho, wo) = _hw(node.args[0]), _hw(node)
    out = []
    for i, o in ((hi, ho), (wi, wo)):
        if o >= i and o % i == 0:
            out.append((o // i, True))
        elif i % o == 0:
            out.append((i // o, False))
        else:
            out.append((0, True))
    return tuple(out)


def _resample_supports(node: Node) -> Optional[str]:
    if any(f == 0 for f, _ in _factors(node)):
        return "resampling by a non-integer factor has no sparse rule"
    if node.target in (aten.upsample_bilinear2d.vec, aten.upsample_bilinear2d.default):
        if arg(node, 2, "align_corners", False):
            return "bilinear resampling with align_corners=True has no sparse rule"
    return None


def _is_bilinear(node: Node) -> bool:
    return node.target in (aten.upsample_bilinear2d.vec, aten.upsample_bilinear2d.default)


def _resample_window(node: Node, block) -> "WindowSpec | str":
    window, stride, offset, crop = [], [], [], []
    for b, (f, up) in zip(block, _factors(node)):
        if not up:
            window.append(b * f), stride.append(b * f), offset.append(0), crop.append(0)
            continue
        if b % f:
            return f"block {b} is not a multiple of the up-sampling factor {f}"
        halo = 1 if _is_bilinear(node) and f > 1 else 0
        window.append(b // f + 2 * halo), stride.append(b // f), offset.append(-halo), crop.append(halo * f)
    mode = "replicate" if _is_bilinear(node) else "constant"
    return WindowSpec(tuple(block), tuple(window), tuple(stride), tuple(offset), mode, 0.0, tuple(crop))


def _resample_grow(node: Node, src: M.MaskExpr, res) -> M.MaskExpr:
    (fh, uh), (fw, uw) = _factors(node)
    if uh and uw:
        if _is_bilinear(node):
            src = M.Window(src, (3, 3), (1, 1), (1, 1), (1, 1), src.res)
        return M.Upsample(src, (fh, fw), res)
    if not uh and not uw:
        return M.Window(src, (fh, fw), (fh, fw), (0, 0), (1, 1), res)
    return M.Resize(src, res)


def _resample_call(node: Node, windows, spec: WindowSpec):
    size = [w * f if up else w // f for w, (f, up) in zip(spec.window, _factors(node))]
    if _is_bilinear(node):
        return aten.upsample_bilinear2d.vec, (windows, size, False, None), {}
    return aten.upsample_nearest2d.vec, (windows, size, None), {}


def _resample_block_multiple(node: Node) -> tuple[int, int]:
    """Each output block of a nearest or bilinear up-sampling reads whole input pixels."""
    return tuple(f if up and f else 1 for f, up in _factors(node))


_RESAMPLE = LocalRule(window=_resample_window, grow=_resample_grow, block_call=_resample_call,
                      block_multiple=_resample_block_multiple)

# ---------------------------------------------------------------------------------------------
# padding


def _pad_params(node: Node) -> tuple[tuple[int, int, int, int], str, float]:
    """``(left, right, top, bottom)``, mode, value."""
    if node.target in (aten.reflection_pad2d.default, aten.replication_pad2d.default):
        pads = list(node.args[1])
        mode = "reflect" if node.target == aten.reflection_pad2d.default else "replicate"
        return tuple(pads), mode, 0.0
    pads = list(node.args[1])
    if node.target == aten.pad.default:
        mode = arg(node, 2, "mode", "constant")
        value = arg(node, 3, "value", None) or 0.0
    else:
        mode, value = "constant", arg(node, 2, "value", 0.0)
    pads = pads + [0] * (4 - len(pads))
    return tuple(pads[:4]), mode, float(value)


def _pad_supports(node: Node) -> Optional[str]:
    pads = list(node.args[1])
    if len(pads) > 4 and any(pads[4:]):
        return "padding of non-spatial dimensions"
    if _pad_params(node)[1] not in ("constant", "reflect", "replicate"):
        return f"pad mode {_pad_params(node)[1]!r} has no sparse rule"
    return None


def _pad_window(node: Node, block) -> WindowSpec:
    (left, _, top, _), mode, value = _pad_params(node)
    return WindowSpec(tuple(block), tuple(block), tuple(block), (-top, -left), mode, value)


_PAD = LocalRule(
    window=_pad_window,
    grow=lambda node, src, res: M.Pad(src, _pad_params(node)[0], _pad_params(node)[1], res),
    block_call=lambda node, windows, spec: (None, (windows,), {}),  # the gathered window is the output
)

# ---------------------------------------------------------------------------------------------
# pointwise, channelwise and norm capability checks


def _eval_dropout(node: Node) -> Optional[str]:
    return "dropout in training mode" if arg(node, 2, "train", False) else None


def _eval_batch_norm(node: Node) -> Optional[str]:
    return "batch_norm in training mode" if arg(node, 5, "training", False) else None


def _layout_of(node) -> Optional[object]:
    info = node.meta.get(K.SPATIAL) if isinstance(node, Node) else None
    return info if info is not None and info.kind.value == "image" else None


def _dim_is_channel(index: int, name: str, default):
    """The op works along ``dim`` only, and ``dim`` is the channel dimension of its image input."""
    def check(node: Node) -> Optional[str]:
        dim = arg(node, index, name, default)
        first = node.args[0][0] if isinstance(node.args[0], (list, tuple)) else node.args[0]
        info = _layout_of(first)
        v = _val(first)
        if info is None or v is None or v.dim() != 4:
            return "input is not a 4-D image"
        dims = dim if isinstance(dim, (list, tuple)) else [dim]
        if dims and all(d is not None and d % 4 == info.channel_dim for d in dims):
            return None
        return "operates across spatial dimensions"
    return check


def _permute_supports(node: Node) -> Optional[str]:
    info = _layout_of(node.args[0])
    dims = tuple(int(d) % 4 for d in node.args[1])
    wanted = (0, 2, 3, 1) if info is not None and info.layout == "nchw" else (0, 3, 1, 2)
    return None if dims == wanted else "permutes spatial dimensions"


def _channels_last_only(what: str):
    """layer_norm / linear act on the last dimension: per pixel only when channels are last."""
    def check(node: Node) -> Optional[str]:
        info = _layout_of(node.args[0])
        if info is None or info.layout != "nhwc":
            return f"{what} over the last dimension of an NCHW image mixes pixels (width)"
        if node.target == aten.layer_norm.default and len(node.args[1]) != 1:
            return "layer_norm over spatial dimensions"
        return None
    return check


def _attention_supports(node: Node) -> Optional[str]:
    """The query must be a channels-last image; keys and values may be images or independent of the edit."""
    query = _layout_of(node.args[0])
    if query is None or query.layout != "nhwc":
        return "query is not a channels-last image"
    for operand in node.args[1:3]:
        info = operand.meta.get(K.SPATIAL)
        if info is not None and info.tainted and _layout_of(operand) is None:
            return f"{operand.name} (keys or values) depends on the edit but is not an image"
    return None


def _group_norm_supports(node: Node) -> Optional[str]:
    return None if _val(node.args[0]) is not None and _val(node.args[0]).dim() == 4 else "not a 4-D input"


def _instance_norm_supports(node: Node) -> Optional[str]:
    return None if arg(node, 5, "use_input_stats", True) else "instance_norm with running statistics"


_ACTIVATIONS = {
    aten.silu.default: lambda node: ("silu", 0.0),
    aten.relu.default: lambda node: ("relu", 0.0),
    aten.sigmoid.default: lambda node: ("sigmoid", 0.0),
    aten.tanh.default: lambda node: ("tanh", 0.0),
    aten.leaky_relu.default: lambda node: ("leaky_relu", float(arg(node, 1, "negative_slope", 0.01))),
    aten.gelu.default: lambda node: ("gelu_tanh" if arg(node, 1, "approximate", "none") == "tanh" else "gelu", 0.0),
}

_EXTRA_POINTWISE = {
    aten.dropout.default: OpRule(OpKind.POINTWISE, _eval_dropout, spatial_args=(0,)),
    aten.batch_norm.default: OpRule(OpKind.POINTWISE, _eval_batch_norm, spatial_args=(0,)),
    aten._native_batch_norm_legit_no_training.default: OpRule(OpKind.POINTWISE, spatial_args=(0,)),
    aten.to.dtype: OpRule(OpKind.POINTWISE, spatial_args=(0,)),
    aten._to_copy.default: OpRule(OpKind.POINTWISE, spatial_args=(0,)),
    aten.alias.default: OpRule(OpKind.POINTWISE),
    aten.contiguous.default: OpRule(OpKind.POINTWISE, spatial_args=(0,)),
    aten.detach.default: OpRule(OpKind.POINTWISE),
}

_TABLE: dict = {
    **_EXTRA_POINTWISE,
    aten.conv2d.default: OpRule(OpKind.LOCAL, _conv_supports, _CONV, spatial_args=(0,)),
    aten.conv2d.padding: OpRule(OpKind.LOCAL, _conv_supports, _CONV, spatial_args=(0,)),
    aten.convolution.default: OpRule(OpKind.LOCAL, _conv_supports, _CONV, spatial_args=(0,)),
    aten.max_pool2d.default: OpRule(OpKind.LOCAL, _max_pool_supports, _MAX_POOL, spatial_args=(0,)),
    aten.avg_pool2d.default: OpRule(OpKind.LOCAL, _avg_pool_supports, _AVG_POOL, spatial_args=(0,)),
    aten.upsample_nearest2d.vec: OpRule(OpKind.LOCAL, _resample_supports, _RESAMPLE, spatial_args=(0,)),
    aten.upsample_nearest2d.default: OpRule(OpKind.LOCAL, _resample_supports, _RESAMPLE, spatial_args=(0,)),
    aten.upsample_bilinear2d.vec: OpRule(OpKind.LOCAL, _resample_supports, _RESAMPLE, spatial_args=(0,)),
    aten.upsample_bilinear2d.default: OpRule(OpKind.LOCAL, _resample_supports, _RESAMPLE, spatial_args=(0,)),
    aten.constant_pad_nd.default: OpRule(OpKind.LOCAL, _pad_supports, _PAD, spatial_args=(0,)),
    aten.pad.default: OpRule(OpKind.LOCAL, _pad_supports, _PAD, spatial_args=(0,)),
    aten.reflection_pad2d.default: OpRule(OpKind.LOCAL, _pad_supports, _PAD, spatial_args=(0,)),
    aten.replication_pad2d.default: OpRule(OpKind.LOCAL, _pad_supports, _PAD, spatial_args=(0,)),
    aten.cat.default: OpRule(OpKind.CHANNELWISE, _dim_is_channel(1, "dim", 0)),
    aten.slice.Tensor: OpRule(OpKind.CHANNELWISE, _dim_is_channel(1, "dim", 0), spatial_args=(0,)),
    aten.split.Tensor: OpRule(OpKind.CHANNELWISE, _dim_is_channel(2, "dim", 0), spatial_args=(0,)),
    aten.split_with_sizes.default: OpRule(OpKind.CHANNELWISE, _dim_is_channel(2, "dim", 0), spatial_args=(0,)),
    aten.chunk.default: OpRule(OpKind.CHANNELWISE, _dim_is_channel(2, "dim", 0), spatial_args=(0,)),
    aten.mean.dim: OpRule(OpKind.CHANNELWISE, _dim_is_channel(1, "dim", None), spatial_args=(0,)),
    aten.sum.dim_IntList: OpRule(OpKind.CHANNELWISE, _dim_is_channel(1, "dim", None), spatial_args=(0,)),
    aten.amax.default: OpRule(OpKind.CHANNELWISE, _dim_is_channel(1, "dim", None), spatial_args=(0,)),
    aten.permute.default: OpRule(OpKind.CHANNELWISE, _permute_supports, spatial_args=(0,)),
    aten.layer_norm.default: OpRule(OpKind.CHANNELWISE, _channels_last_only("layer_norm"), spatial_args=(0,)),
    aten.linear.default: OpRule(OpKind.CHANNELWISE, _channels_last_only("linear"), spatial_args=(0,)),
    aten.group_norm.default: OpRule(OpKind.NORM, _group_norm_supports, spatial_args=(0,)),
    aten.instance_norm.default: OpRule(OpKind.NORM, _instance_norm_supports, spatial_args=(0,)),
    torch.ops.sigec.attention.default: OpRule(OpKind.ATTENTION, _attention_supports, spatial_args=(0, 1, 2)),
    operator.getitem: OpRule(OpKind.PROJECTION, spatial_args=(0,)),
    aten._assert_tensor_metadata.default: OpRule(OpKind.IGNORED),
    aten._assert_scalar.default: OpRule(OpKind.IGNORED),
}


def _check_table() -> None:
    """Import-time invariants: local rules carry geometry; nothing else does."""
    for target, rule in _TABLE.items():
        if (rule.kind is OpKind.LOCAL) != (rule.local is not None):
            raise AssertionError(f"op table entry {target}: LOCAL rules need a LocalRule and only they")


_check_table()


def lookup(target) -> Optional[OpRule]:
    """The rule for ``target``, or ``None`` (fallback). Pointwise ops come from the schema tag."""
    rule = _TABLE.get(target)
    if rule is not None:
        return rule
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        act = _ACTIVATIONS.get(target)
        return OpRule(OpKind.POINTWISE, activation=act)
    return None


def num_groups(node: Node) -> int:
    """Groups of a NORM node (instance norm normalizes each channel alone)."""
    if node.target == aten.group_norm.default:
        return int(node.args[1])
    return int(_val(node.args[0]).shape[1])


def norm_args(node: Node):
    """``(x, weight, bias, eps)`` of a NORM node."""
    if node.target == aten.group_norm.default:
        return node.args[0], arg(node, 2, "weight"), arg(node, 3, "bias"), float(arg(node, 4, "eps", 1e-5))
    return node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias"), float(arg(node, 7, "eps", 1e-5))


def known_targets() -> list:
    """Every explicitly listed target (for docs and completeness tests)."""
    return list(_TABLE)
