"""How every value behaves under patch-wise (tiled) execution.

Writes ``TILE`` (a ``TileRule``) on every node. Reads ``SPATIAL`` (classify_spatial) and the op
table's kinds. Kinds (``TileKind``):

* ``SOURCE``     - model inputs and values that do not depend on a spatial input (weights,
  timestep embeddings): available whole before any tile runs.
* ``POINTWISE``  - an output pixel needs the same pixel of each image operand: the op table's
  pointwise and channel-wise ops, getitem projections, same-shape views.
* ``WINDOW``     - a local op with an analytic input window (convolution, transposed
  convolution, max/avg pooling, bilinear resampling by integer factors): ``geometry.needs``
  maps an output interval to the input interval, ``geometry.run`` computes the op on it.
* ``GATHER``     - an op whose every output pixel copies one input pixel or a constant (padding
  of any mode, nearest resampling by any factor, spatial slices, flips, rolls). Its per-axis
  index maps are read off the op itself, run once on index grids, so they match it exactly.
* ``NORM``       - group / instance norm, and layer norm over the spatial dimensions: statistics
  over the whole image, synchronized across tiles.
* ``GLOBAL``     - runs whole at its own resolution (attention, reductions over space, reshapes
  to and from tokens): everything whose output or a space-varying input is not image-like.
* ``IGNORED``    - runtime assertions.
* ``UNTILEABLE`` - an image-to-image op with no rule above; compiling fails with its name
  unless the planner runs its whole resolution untiled.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from sigec.ir import meta_keys as K
from sigec.passes.op_table import OpKind, arg, lookup
from sigec.passes.pass_base import PassContext, sigec_pass
from sigec.ir.plan import NCHW, SpatialKind

aten = torch.ops.aten
Interval = tuple[int, int]


class TileKind(enum.Enum):
    SOURCE = "source"
    POINTWISE = "pointwise"
    WINDOW = "window"
    GATHER = "gather"
    NORM = "norm"
    GLOBAL = "global"
    IGNORED = "ignored"
    UNTILEABLE = "untileable"


class Role(enum.Enum):
    """How a tiled op reads one operand."""

    IMAGE = "image"      #: a tiled or whole image value: the region the op needs
    SPATIAL = "spatial"  #: a whole tensor whose trailing spatial dims equal the op's: sliced like an image
    WHOLE = "whole"      #: broadcasts over space (weights, scalars, per-channel vectors): passed as it is


@dataclasses.dataclass(frozen=True)
class TileRule:
    kind: TileKind
    reason: str = ""
    geometry: Optional[object] = None
    #: per flattened operand node (in ``node.all_input_nodes`` order): its ``Role``
    roles: tuple = ()

    def role(self, node: Node, operand: Node) -> Role:
        return self.roles[node.all_input_nodes.index(operand)]


# ---------------------------------------------------------------------------------------------
# helpers


def _val(node) -> Optional[torch.Tensor]:
    v = node.meta.get("val") if isinstance(node, Node) else None
    if isinstance(v, (tuple, list)) and v and isinstance(v[0], torch.Tensor):
        v = v[0]
    return v if isinstance(v, torch.Tensor) else None


def _pair(v, default: int) -> tuple[int, int]:
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        return (default, default)
    if isinstance(v, int):
        return (v, v)
    v = [int(x) for x in v]
    return (v[0], v[-1])


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def pad_to(x: torch.Tensor, have: tuple[Interval, Interval], want: tuple[Interval, Interval],
           mode: str = "constant", value: float = 0.0) -> torch.Tensor:
    """Extend ``x`` (covering ``have`` along H and W) to cover ``want`` with ``mode`` padding.

    ``want`` must contain ``have``; this recreates the padding the op applied at the image border.
    """
    pads = []
    for (hl, hh), (wl, wh) in reversed(list(zip(have, want))):
        pads += [hl - wl, wh - hh]
    if not any(pads):
        return x
    if mode == "constant":
        return F.pad(x, pads, value=value)
    return F.pad(x, pads, mode=mode)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` NHWC-contiguous. oneDNN convolves NHWC tensors as they are, with an NHWC output;
    an NCHW input costs an input and an output reorder (three times the output's memory, and
    slower). A tile's conv input is usually a fresh crop or padded copy anyway, so converting it
    costs nothing extra, and the NHWC output then flows through pointwise ops and norms unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _place(y: torch.Tensor, start: tuple[int, int], want: tuple[Interval, Interval]) -> torch.Tensor:
    """``y`` covers global rows/cols from ``start``; return exactly ``want``, zero outside ``y``."""
    out = y
    for axis, (s, (a, b)) in enumerate(zip(start, want)):
        dim = axis + 2
        before, after = s - a, (b - a) - (s - a) - out.shape[dim]
        if before < 0:
            out = out.narrow(dim, -before, out.shape[dim] + before)
            before = 0
        if after < 0:
            out = out.narrow(dim, 0, out.shape[dim] + after)
            after = 0
        if before or after:
            pads = [0, 0, 0, 0]
            pads[2 * (1 - axis)], pads[2 * (1 - axis) + 1] = before, after
            out = F.pad(out, pads)
    return out


# ---------------------------------------------------------------------------------------------
# window geometries: needs(axis, a, b) -> input interval; run(x, args, kwargs, want_in, out) -> output


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Convolution and pooling: output ``o`` reads input ``o*s - p + d*j`` for ``j < k``."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    op: str  # "conv", "max_pool", "avg_pool"

    @property
    def pad_value(self) -> float:
        return float("-inf") if self.op == "max_pool" else 0.0

    def needs(self, axis: int, a: int, b: int) -> Interval:
        k, s, p, d = self.kernel[axis], self.stride[axis], self.padding[axis], self.dilation[axis]
        return a * s - p, (b - 1) * s - p + d * (k - 1) + 1

    def run(self, x, have, want, out, args, kwargs) -> torch.Tensor:
        x = pad_to(x, have, want, "constant", self.pad_value)
        if self.op == "conv":
            x = channels_last(x)
            groups = args[8] if len(args) > 8 and isinstance(args[6], bool) else arg_value(args, kwargs, 6, "groups", 1)
            return torch.conv2d(x, args[1], _bias(args, kwargs), list(self.stride), 0, list(self.dilation), groups)
        if self.op == "max_pool":
            return F.max_pool2d(x, list(self.kernel), list(self.stride), 0, list(self.dilation))
        divisor = arg_value(args, kwargs, 6, "divisor_override", None)
        return torch.ops.aten.avg_pool2d.default(x, list(self.kernel), list(self.stride), [0, 0], False, True, divisor)


def arg_value(args, kwargs, index: int, name: str, default):
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _bias(args, kwargs):
    return arg_value(args, kwargs, 2, "bias", None)


@dataclasses.dataclass(frozen=True)
class ConvTransposeGeometry:
    """Transposed convolution: input ``i`` writes outputs ``i*s - p + d*j`` for ``j < k``."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    def needs(self, axis: int, a: int, b: int) -> Interval:
        k, s, p, d = self.kernel[axis], self.stride[axis], self.padding[axis], self.dilation[axis]
        return _ceil_div(a + p - d * (k - 1), s), (b - 1 + p) // s + 1

    def run(self, x, have, want, out, args, kwargs) -> torch.Tensor:
        x = channels_last(pad_to(x, have, want))  # inputs past the border contribute nothing: zeros
        weight, bias = args[1], _bias(args, kwargs)
        groups = args[8] if len(args) > 8 else arg_value(args, kwargs, 6, "groups", 1)
        y = F.conv_transpose2d(x, weight, None, list(self.stride), 0, 0, groups, list(self.dilation))
        start = tuple(lo * s - p for (lo, _), s, p in zip(want, self.stride, self.padding))
        y = _place(y, start, out)
        return y if bias is None else y + bias.view(1, -1, 1, 1)


@dataclasses.dataclass(frozen=True)
class BilinearGeometry:
    """Bilinear resampling (``align_corners=False``) by an integer factor per axis, up or down."""

    factors: tuple[tuple[int, bool], tuple[int, bool]]  # (factor, up) per axis

    def needs(self, axis: int, a: int, b: int) -> Interval:
        f, up = self.factors[axis]
        if up:
            return a // f - 1, (b - 1) // f + 2
        return a * f, b * f

    def run(self, x, have, want, out, args, kwargs) -> torch.Tensor:
        x = pad_to(x, have, want, "replicate")
        size = [(hi - lo) * f if up else (hi - lo) // f for (lo, hi), (f, up) in zip(want, self.factors)]
        y = torch.ops.aten.upsample_bilinear2d.vec(x, size, False, None)
        start = tuple(lo * f if up else lo // f for (lo, _), (f, up) in zip(want, self.factors))
        return _place(y, start, out)


@dataclasses.dataclass(frozen=True)
class GatherGeometry:
    """Output pixel ``(o_h, o_w)`` copies input ``(src_h[o_h], src_w[o_w])``, or ``fill`` where a map is -1."""

    src: tuple[torch.Tensor, torch.Tensor]
    fill: float
    #: per axis, ``f`` where the map is ``o // f`` (nearest up-sampling by an integer factor, or 1:
    #: the identity), else 0; with both set, ``run`` repeats pixels instead of indexing
    repeats: tuple[int, int] = (0, 0)

    def needs(self, axis: int, a: int, b: int) -> Interval:
        idx = self.src[axis][a:b]
        idx = idx[idx >= 0]
        if idx.numel() == 0:
            return 0, 0
        return int(idx.min()), int(idx.max()) + 1

    def run(self, x, have, want, out, args, kwargs) -> torch.Tensor:
        if all(self.repeats):
            return self._repeat(x, have, out)
        if any(bool((self.src[axis][a:b] < 0).all()) for axis, (a, b) in enumerate(out)):
            return x.new_full((*x.shape[:2], out[0][1] - out[0][0], out[1][1] - out[1][0]), self.fill)
        y = x
        fills = []
        for axis, ((a, b), (lo, _)) in enumerate(zip(out, have)):
            idx = self.src[axis][a:b]
            missing = idx < 0
            y = y.index_select(axis + 2, (idx.clamp(min=lo) - lo).to(x.device))
            fills.append(missing)
        for axis, missing in enumerate(fills):
            if bool(missing.any()):
                y = y.clone() if y is x else y
                index = [slice(None)] * 4
                index[axis + 2] = missing.to(y.device)
                y[tuple(index)] = self.fill
        return y

    def _repeat(self, x, have, out) -> torch.Tensor:
        # index_select along both axes copies twice and is slow on strided crops; a broadcast
        # repeat of the input lines the region reads is one copy
        (fh, fw), ((a, b), (c, d)) = self.repeats, out
        r0, r1, c0, c1 = a // fh, (b - 1) // fh + 1, c // fw, (d - 1) // fw + 1
        x = x[..., r0 - have[0][0]:r1 - have[0][0], c0 - have[1][0]:c1 - have[1][0]]
        n, ch, h, w = x.shape
        if x.stride(1) == 1 and ch > 1:  # NHWC in memory: repeat in that order, so the result is NHWC too
            y = x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(n, h, fh, w, fw, ch)
            y = y.reshape(n, h * fh, w * fw, ch).permute(0, 3, 1, 2)
        else:
            y = x[:, :, :, None, :, None].expand(n, ch, h, fh, w, fw).reshape(n, ch, h * fh, w * fw)
        return y[..., a - r0 * fh:b - r0 * fh, c - c0 * fw:d - c0 * fw]


def _repeat_factor(src: torch.Tensor) -> int:
    """``f`` when ``src[o] == o // f`` for every output ``o``, else 0."""
    n = src.numel()
    for f in range(1, n + 1):
        if int(src[-1]) == (n - 1) // f and torch.equal(src, torch.arange(n) // f):
            return f
    return 0


@dataclasses.dataclass(frozen=True)
class NormGeometry:
    """Normalization over channel groups and the whole image; the affine may vary over space."""

    groups: int
    eps: float
    weight: Optional[Node]
    bias: Optional[Node]


# ---------------------------------------------------------------------------------------------
# per-op classification


def _conv_geometry(node: Node) -> "ConvGeometry | ConvTransposeGeometry | str":
    w = _val(node.args[1])
    if w is None or w.dim() != 4:
        return "not a 2-D convolution"
    kernel = (int(w.shape[2]), int(w.shape[3]))
    if node.target == aten.convolution.default:
        stride, padding, dilation = _pair(node.args[3], 1), _pair(node.args[4], 0), _pair(node.args[5], 1)
        if node.args[6]:
            return ConvTransposeGeometry(kernel, stride, padding, dilation)
        return ConvGeometry(kernel, stride, padding, dilation, "conv")
    stride, dilation = _pair(arg(node, 3, "stride", 1), 1), _pair(arg(node, 5, "dilation", 1), 1)
    if node.target == aten.conv_transpose2d.input:
        padding = _pair(arg(node, 4, "padding", 0), 0)
        dilation = _pair(arg(node, 7, "dilation", 1), 1)
        return ConvTransposeGeometry(kernel, stride, padding, dilation)
    pad = arg(node, 4, "padding", 0)
    if isinstance(pad, str):  # "same" pads total d*(k-1), the smaller half first
        padding = (0, 0) if pad == "valid" else tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    else:
        padding = _pair(pad, 0)
    return ConvGeometry(kernel, stride, padding, dilation, "conv")


def _pool_geometry(node: Node) -> "ConvGeometry | str":
    kernel = _pair(node.args[1], 1)
    stride = _pair(arg(node, 2, "stride", None), 1) if arg(node, 2, "stride", None) else kernel
    padding = _pair(arg(node, 3, "padding", 0), 0)
    if node.target == aten.max_pool2d.default:
        # ceil_mode only adds windows that run past the border, which -inf padding reproduces
        return ConvGeometry(kernel, stride, padding, _pair(arg(node, 4, "dilation", 1), 1), "max_pool")
    if arg(node, 4, "ceil_mode", False):
        return "avg_pool2d with ceil_mode divides border windows by fewer pixels"
    if not arg(node, 5, "count_include_pad", True) and any(padding):
        return "avg_pool2d with count_include_pad=False and padding divides border windows by fewer pixels"
    return ConvGeometry(kernel, stride, padding, (1, 1), "avg_pool")


def _hw(node) -> tuple[int, int]:
    v = _val(node)
    return int(v.shape[-2]), int(v.shape[-1])


def _bilinear_geometry(node: Node) -> "BilinearGeometry | str":
    if arg(node, 2, "align_corners", False):
        return "bilinear resampling with align_corners=True scales by (in-1)/(out-1)"
    factors = []
    for i, o in zip(_hw(node.args[0]), _hw(node)):
        if o >= i and o % i == 0:
            factors.append((o // i, True))
        elif o < i and i % o == 0:
            factors.append((i // o, False))
        else:
            return f"bilinear resampling from {i} to {o} pixels is not by an integer factor"
    scales = arg(node, 3, "scale_factors", None) if node.target == aten.upsample_bilinear2d.vec else None
    if scales is not None and any(abs(s - (f if up else 1 / f)) > 1e-9 for s, (f, up) in zip(scales, factors)):
        return "bilinear resampling whose scale factor differs from its size ratio"
    return BilinearGeometry(tuple(factors))


def _probe_gather(node: Node) -> "GatherGeometry | str":
    """Run the op on index grids (rows, then columns) to read its per-axis index maps.

    Each probe runs twice, on ``index + 1`` and ``index + 2``: copied pixels differ by one between
    the runs, filled ones do not.
    """
    if any(isinstance(a, Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
        return "its arguments depend on the input"
    (hi, wi), (ho, wo) = _hw(node.args[0]), _hw(node)
    maps, fill = [], None
    for axis, size_in in enumerate((hi, wi)):
        shape = (1, 1, hi, 1) if axis == 0 else (1, 1, 1, wi)
        grid = (torch.arange(size_in, dtype=torch.float32) + 1).view(shape).expand(1, 1, hi, wi).contiguous()
        a = node.target(grid, *node.args[1:], **node.kwargs)
        b = node.target(grid + 1, *node.args[1:], **node.kwargs)
        if tuple(a.shape[-2:]) != (ho, wo):
            return "its output size depends on more than the input size"
        a, b = (a[0, 0], b[0, 0]) if axis == 0 else (a[0, 0].t(), b[0, 0].t())
        data = (b - a) == 1
        if bool((~data).any()):
            values = a[~data]
            if not bool(torch.all((values == values[0]) | (values.isnan() & values[0].isnan()))):
                return "it fills with more than one value"
            fill = float(values[0])
        # along this axis every output line copies one input line, wherever the other axis copies
        src = torch.where(data, a - 1, torch.full_like(a, float("inf"))).amin(dim=1)
        high = torch.where(data, a - 1, torch.full_like(a, float("-inf"))).amax(dim=1)
        copied = data.any(dim=1)
        if not torch.equal(src[copied], high[copied]):
            return "it mixes rows and columns"
        maps.append(torch.where(copied, src, torch.full_like(src, -1)).long())
    repeats = (0, 0) if fill is not None else tuple(_repeat_factor(m) for m in maps)
    return GatherGeometry(tuple(maps), 0.0 if fill is None else fill, repeats)


def _gather_supports(node: Node) -> Optional[str]:
    if node.target == aten.slice.Tensor:
        return None if arg(node, 1, "dim", 0) % 4 in (2, 3) else "slices channels"
    if node.target == aten.flip.default:
        return None if all(d % 4 in (2, 3) for d in node.args[1]) else "flips non-spatial dimensions"
    if node.target == aten.roll.default:
        dims = arg(node, 2, "dims", [])
        return None if dims and all(d % 4 in (2, 3) for d in dims) else "rolls non-spatial dimensions"
    if node.target == aten.pad.default and arg(node, 2, "mode", "constant") not in (
            "constant", "reflect", "replicate", "circular"):
        return f"pad mode {arg(node, 2, 'mode', 'constant')!r}"
    if node.target in (aten.pad.default, aten.constant_pad_nd.default):
        pads = list(node.args[1])
        return "pads non-spatial dimensions" if any(pads[4:]) else None
    return None


_WINDOW_RULES = {
    aten.conv2d.default: _conv_geometry,
    aten.conv2d.padding: _conv_geometry,
    aten.convolution.default: _conv_geometry,
    aten.conv_transpose2d.input: _conv_geometry,
    aten.max_pool2d.default: _pool_geometry,
    aten.avg_pool2d.default: _pool_geometry,
    aten.upsample_bilinear2d.vec: _bilinear_geometry,
    aten.upsample_bilinear2d.default: _bilinear_geometry,
}

_GATHER_TARGETS = (
    aten.constant_pad_nd.default, aten.pad.default, aten.reflection_pad2d.default, aten.replication_pad2d.default,
    aten.upsample_nearest2d.vec, aten.upsample_nearest2d.default, aten._upsample_nearest_exact2d.vec,
    aten._upsample_nearest_exact2d.default, aten.slice.Tensor, aten.flip.default, aten.roll.default,
)

#: same-shape views are identities on an image
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
          aten.contiguous.default, aten.clone.default)


def _norm_geometry(node: Node) -> "NormGeometry | str | None":
    """``NormGeometry`` for a synchronized norm, a reason it cannot be, or ``None`` (not a norm)."""
    x = _val(node.args[0])
    if node.target == aten.group_norm.default:
        return NormGeometry(int(node.args[1]), float(arg(node, 4, "eps", 1e-5)), arg(node, 2, "weight"),
                            arg(node, 3, "bias"))
    if node.target == aten.instance_norm.default:
        if not arg(node, 5, "use_input_stats", True):
            return None  # running statistics: a per-channel affine, pointwise
        return NormGeometry(int(x.shape[1]), float(arg(node, 7, "eps", 1e-5)), arg(node, 1, "weight"),
                            arg(node, 2, "bias"))
    if node.target == aten.layer_norm.default and node.args[0].meta[K.SPATIAL].layout == NCHW:
        dims = len(node.args[1])
        if dims == 3:
            return NormGeometry(1, float(arg(node, 4, "eps", 1e-5)), arg(node, 2, "weight"), arg(node, 3, "bias"))
        if dims == 2:
            return NormGeometry(int(x.shape[1]), float(arg(node, 4, "eps", 1e-5)), arg(node, 2, "weight"),
                                arg(node, 3, "bias"))
        return "layer_norm over the width alone normalizes each row"
    return None


def _operand_roles(node: Node, out_info, spatial_args=None) -> "tuple | str":
    """Role of each input of a tiled op, or why the op cannot be tiled. With ``spatial_args``
    (the op table's image argument positions), the other arguments are per-channel constants."""
    roles = []
    res = out_info.resolution
    image_args = None
    if spatial_args is not None:
        image_args = {a for i in spatial_args if i < len(node.args) for a in _nodes_in(node.args[i])}
    for op in node.all_input_nodes:
        info = op.meta[K.SPATIAL]
        if image_args is not None and op not in image_args:
            if info.tainted:
                return f"argument {op.name} depends on the image but is not an image argument"
            roles.append(Role.WHOLE)
            continue
        if info.kind is SpatialKind.IMAGE:
            if info.resolution != res:
                return f"mixes resolutions {info.resolution} and {res}"
            roles.append(Role.IMAGE)
            continue
        v = _val(op)
        if v is None or v.dim() == 0:
            roles.append(Role.WHOLE)
            continue
        padded = [1] * max(0, 4 - v.dim()) + list(v.shape)[-4:]
        hw = out_info.spatial_shape(padded)
        if hw == (1, 1):
            roles.append(Role.WHOLE)
        elif hw == tuple(res) and v.dim() >= (2 if out_info.layout == NCHW else 3):
            roles.append(Role.SPATIAL)
        else:
            return f"operand {op.name} of shape {tuple(v.shape)} varies over space"
    return tuple(roles)


def classify_node(node: Node) -> TileRule:
    """The ``TileRule`` of one node (``SPATIAL`` must be set on it and its inputs)."""
    info = node.meta[K.SPATIAL]
    if node.op == "placeholder" or not info.tainted:
        return TileRule(TileKind.SOURCE)
    if node.op != "call_function":
        return TileRule(TileKind.GLOBAL, "not an ATen call")
    rule = lookup(node.target)
    if rule is not None and rule.kind is OpKind.IGNORED:
        return TileRule(TileKind.IGNORED)
    if node.target == operator.getitem:
        src = node.args[0].meta.get(K.TILE)
        if src is not None and src.kind in (TileKind.POINTWISE,) and info.kind is SpatialKind.IMAGE:
            return TileRule(TileKind.POINTWISE, roles=(Role.IMAGE,))
        return TileRule(TileKind.GLOBAL, "projection of a whole value")
    if info.kind is not SpatialKind.IMAGE:
        return TileRule(TileKind.GLOBAL, "output is not image-like")
    inputs = node.all_input_nodes
    if any(i.meta[K.SPATIAL].kind is SpatialKind.DERIVED and not _broadcasts(i, info) for i in inputs):
        return TileRule(TileKind.GLOBAL, "built from a whole-image value (tokens, pooled features)")
    roles = _operand_roles(node, info, rule.spatial_args if rule is not None else None)
    # per-op geometry
    norm = _norm_geometry(node) if node.target in (aten.group_norm.default, aten.instance_norm.default,
                                                   aten.layer_norm.default) else None
    if isinstance(norm, str):
        return TileRule(TileKind.UNTILEABLE, norm)
    if norm is not None:
        if any(i.meta[K.SPATIAL].tainted for i in inputs[1:]):
            return TileRule(TileKind.UNTILEABLE, "its affine depends on the image")
        # per-channel affines pass whole; layer norm's (C, H, W) or (H, W) affine is cropped like the image
        roles = (Role.IMAGE,) + tuple(Role.SPATIAL if _val(i) is not None and _val(i).dim() >= 2 else Role.WHOLE
                                      for i in inputs[1:])
        return TileRule(TileKind.NORM, geometry=norm, roles=roles)
    src_info = node.args[0].meta[K.SPATIAL] if node.args and isinstance(node.args[0], Node) else None
    if node.target in _WINDOW_RULES or node.target in _GATHER_TARGETS:
        if src_info is None or src_info.kind is not SpatialKind.IMAGE or src_info.layout != NCHW:
            return TileRule(TileKind.UNTILEABLE, "input is not an NCHW image")
        if any(i.meta[K.SPATIAL].tainted for i in inputs[1:]):
            return TileRule(TileKind.UNTILEABLE, "a weight or size depends on the image")
        roles = (Role.IMAGE,) + (Role.WHOLE,) * (len(inputs) - 1)
    if node.target in _WINDOW_RULES:
        geometry = _WINDOW_RULES[node.target](node)
        if isinstance(geometry, str):
            return TileRule(TileKind.UNTILEABLE, geometry)
        return TileRule(TileKind.WINDOW, geometry=geometry, roles=roles)
    if node.target in _GATHER_TARGETS and not (node.target == aten.slice.Tensor
                                               and arg(node, 1, "dim", 0) % 4 not in (2, 3)):
        reason = _gather_supports(node)
        geometry = _probe_gather(node) if reason is None else reason
        if isinstance(geometry, str):
            return TileRule(TileKind.UNTILEABLE, geometry)
        return TileRule(TileKind.GATHER, geometry=geometry, roles=roles)
    if isinstance(roles, str):
        return TileRule(TileKind.UNTILEABLE, roles)
    if node.target in _VIEWS and _val(node) is not None and _val(node.args[0]) is not None \
            and tuple(_val(node).shape) == tuple(_val(node.args[0]).shape):
        return TileRule(TileKind.POINTWISE, roles=roles)
    if rule is not None and rule.kind in (OpKind.POINTWISE, OpKind.CHANNELWISE):
        reason = rule.supports(node)
        if reason is None:
            return TileRule(TileKind.POINTWISE, roles=roles)
        return TileRule(TileKind.UNTILEABLE, reason)
    return TileRule(TileKind.UNTILEABLE, f"no tiling rule for {node.target}")


def _nodes_in(value):
    if isinstance(value, Node):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _nodes_in(v)


def _broadcasts(operand: Node, out_info) -> bool:
    v = _val(operand)
    if v is None or v.dim() == 0:
        return True
    padded = [1] * max(0, 4 - v.dim()) + list(v.shape)[-4:]
    return out_info.spatial_shape(padded) == (1, 1)


@sigec_pass(requires=(K.SPATIAL,), provides=(K.TILE,))
def classify_tiling(gm: GraphModule, ctx: PassContext) -> GraphModule:
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        node.meta[K.TILE] = classify_node(node)
    return gm


def interval_len(iv: Interval) -> int:
    return max(0, iv[1] - iv[0])


def area(region: tuple[Interval, Interval]) -> int:
    return math.prod(interval_len(iv) for iv in region)
