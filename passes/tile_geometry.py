"""The vocabulary of ``classify_tiling``'s results: how a value behaves under tiling (``TileKind``,
``Role``, ``TileRule``), the windows of local ops (``ConvGeometry``, ``ConvTransposeGeometry``,
``BilinearGeometry``, ``GatherGeometry``, ``NormGeometry``: which input interval an output interval
needs, and the op computed on it), and intervals and regions. Holds no pass."""
from __future__ import annotations

import dataclasses
import enum
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.fx import Node

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


def tensor_value(node) -> Optional[torch.Tensor]:
    v = node.meta.get("val") if isinstance(node, Node) else None
    if isinstance(v, (tuple, list)) and v and isinstance(v[0], torch.Tensor):
        v = v[0]
    return v if isinstance(v, torch.Tensor) else None


def int_pair(v, default: int) -> tuple[int, int]:
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


def repeat_factor(src: torch.Tensor) -> int:
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


def interval_len(iv: Interval) -> int:
    return max(0, iv[1] - iv[0])


def area(region: tuple[Interval, Interval]) -> int:
    return math.prod(interval_len(iv) for iv in region)
