"""Mask expressions: how each value's active region is derived from the input edit mask.

The analysis (passes/propagate_masks.py) gives every value that depends on a spatial input a
``MaskExpr``: a small hashable expression over the input mask. At run time ``evaluate_masks``
evaluates every expression the plan needs once, on H x W boolean maps (cheap: no channels), and
``active_blocks`` reduces a map to the indices of the active blocks of a grid.

Structural equality of expressions is what lets codegen pass gathered blocks from producer to
consumer without materializing a full tensor, so constructors normalize (``union``).
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Iterable, Mapping, Union

import torch
import torch.nn.functional as F

Resolution = tuple[int, int]


class _Interned:
    """Hash-consing: equal expressions are one object, so hashing and equality are O(1).

    Masks of networks with skip connections are DAGs whose tree expansion is exponential;
    structural hashing would walk it on every dictionary lookup.
    """

    _table: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()

    def __new__(cls, *args, **kwargs):
        names = [f.name for f in dataclasses.fields(cls)]
        values = dict(zip(names, args), **kwargs)
        key = (cls,) + tuple(values[n] for n in names)
        obj = _Interned._table.get(key)
        if obj is None:
            obj = super().__new__(cls)
            _Interned._table[key] = obj
        return obj

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (type(self), tuple(getattr(self, f.name) for f in dataclasses.fields(self)))


@dataclasses.dataclass(frozen=True, eq=False)
class InputMask(_Interned):
    """The edit mask of the spatial inputs, at their resolution."""

    res: Resolution


@dataclasses.dataclass(frozen=True, eq=False)
class Resampled(_Interned):
    """``sige`` policy: input mask resampled to ``res`` (area when shrinking, so a pixel's value is
    its edited coverage), kept where coverage exceeds ``threshold``, then dilated."""

    src: "MaskExpr"
    res: Resolution
    threshold: float
    dilation: int


@dataclasses.dataclass(frozen=True, eq=False)
class Window(_Interned):
    """Receptive-field growth: an output pixel is active if any pixel of its input window is.

    Same geometry as a convolution (``max_pool2d`` over the mask).
    """

    src: "MaskExpr"
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    res: Resolution

    def covers_source(self) -> bool:
        """True when every active source pixel stays active (stride 1, window contains the centre)."""
        for k, s, p, d in zip(self.kernel, self.stride, self.padding, self.dilation):
            if s != 1 or p < 0 or p % d or p // d >= k:
                return False
        return self.res == self.src.res


@dataclasses.dataclass(frozen=True, eq=False)
class Upsample(_Interned):
    """Nearest up-sampling of a mask by an integer factor per dimension."""

    src: "MaskExpr"
    factor: tuple[int, int]
    res: Resolution


@dataclasses.dataclass(frozen=True, eq=False)
class Pad(_Interned):
    """Spatial padding: new border pixels follow ``mode`` (constant pads are inactive)."""

    src: "MaskExpr"
    pads: tuple[int, int, int, int]  # left, right, top, bottom (F.pad order)
    mode: str
    res: Resolution


@dataclasses.dataclass(frozen=True, eq=False)
class Resize(_Interned):
    """Conservative change of resolution (max-pool down, nearest up) for values of unknown geometry."""

    src: "MaskExpr"
    res: Resolution


@dataclasses.dataclass(frozen=True, eq=False)
class Union_(_Interned):
    """Union of masks of one resolution. Build with ``union`` so equal unions compare equal."""

    srcs: frozenset
    res: Resolution


MaskExpr = Union[InputMask, Resampled, Window, Upsample, Pad, Resize, Union_]


def contains(big: MaskExpr, small: MaskExpr) -> bool:
    """Sound (not complete) test that ``small``'s active set is inside ``big``'s, for every input."""
    if big == small:
        return True
    if isinstance(small, Union_):
        return all(contains(big, s) for s in small.srcs)
    if isinstance(big, Union_):
        return any(contains(b, small) for b in big.srcs)
    if isinstance(big, Window) and big.covers_source():
        return contains(big.src, small)
    return False


def union(masks: Iterable[MaskExpr]) -> MaskExpr:
    """Union with members contained in others dropped, so pass-through chains keep one mask."""
    flat: list[MaskExpr] = []
    for m in masks:
        flat.extend(m.srcs if isinstance(m, Union_) else (m,))
    unique = list(dict.fromkeys(flat))
    if not unique:
        raise ValueError("union of no masks")
    res = unique[0].res
    if any(m.res != res for m in unique):
        raise ValueError(f"union of masks at different resolutions: {[m.res for m in unique]}")
    kept = [m for i, m in enumerate(unique)
            if not any(j != i and contains(o, m) and not (contains(m, o) and j > i)
                       for j, o in enumerate(unique))]
    return kept[0] if len(kept) == 1 else Union_(frozenset(kept), res)


def resize(src: MaskExpr, res: Resolution) -> MaskExpr:
    return src if src.res == res else Resize(src, res)


# ---------------------------------------------------------------------------------------------
# evaluation


def _as_float(mask: torch.Tensor) -> torch.Tensor:
    return mask.to(torch.float32)[None, None]


def _or_pool(mask: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
             dilation: tuple[int, int]) -> torch.Tensor:
    """``F.max_pool2d(mask.float(), kernel, stride, 0, dilation) > 0`` of an H x W boolean map,
    computed on booleans: the window is a product of a row and a column window, so the pooling
    is an OR of ``kernel[1]`` strided column slices, then of ``kernel[0]`` row slices. Equal to
    the pooling bit for bit, and about twenty times cheaper on a CPU (no float map, no float
    max over 2-D windows)."""
    out = mask
    for dim, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
        size = (out.shape[dim] - d * (k - 1) - 1) // s + 1
        if size <= 0:
            raise RuntimeError(f"mask window {kernel} (dilation {dilation}) is larger than the mask {tuple(mask.shape)}")
        span = s * (size - 1) + 1
        parts = [out.narrow(dim, t * d, span) for t in range(k)]
        if s != 1:
            parts = [p[::s] if dim == 0 else p[:, ::s] for p in parts]
        acc = parts[0] if k == 1 else parts[0] | parts[1]
        for p in parts[2:]:
            acc |= p
        out = acc
    return out


def _evaluate(expr: MaskExpr, memo: dict, base: torch.Tensor) -> torch.Tensor:
    if expr in memo:
        return memo[expr]
    if isinstance(expr, InputMask):
        out = base
    elif isinstance(expr, Resampled):
        src = _as_float(_evaluate(expr.src, memo, base))
        if src.shape[-2:] != expr.res:
            # Area resampling makes each coarse pixel its edited coverage, so ``threshold`` is a
            # coverage fraction; a triangle (bilinear) filter would bleed into neighbours unevenly.
            down = expr.res[0] <= src.shape[-2] and expr.res[1] <= src.shape[-1]
            src = F.interpolate(src, size=expr.res, mode="area" if down else "bilinear",
                                align_corners=None if down else False)
        out = (src > expr.threshold)[0, 0]
        if expr.dilation:
            # max_pool2d(k, 1, padding=dilation): pads with -inf, i.e. with inactive pixels
            d = expr.dilation
            out = _or_pool(F.pad(out, (d, d, d, d)), (2 * d + 1, 2 * d + 1), (1, 1), (1, 1))
    elif isinstance(expr, Window):
        src = _evaluate(expr.src, memo, base)
        if expr.kernel == (1, 1) and expr.stride == (1, 1) and expr.padding == (0, 0) and expr.res == src.shape:
            out = src  # a pointwise window: the source itself
        else:
            # Pad explicitly with inactive pixels (as max_pool2d, which caps padding at half the
            # kernel, needs). The far side gets a whole extra window, so asymmetric ("same" with
            # even kernels) padding is covered too; _fit crops to the known output resolution.
            ph, pw = expr.padding
            extra_h = expr.dilation[0] * expr.kernel[0]
            extra_w = expr.dilation[1] * expr.kernel[1]
            src = F.pad(src, (pw, pw + extra_w, ph, ph + extra_h))
            out = _fit(_or_pool(src, expr.kernel, expr.stride, expr.dilation), expr.res)
    elif isinstance(expr, Upsample):
        src = _evaluate(expr.src, memo, base)
        out = src.repeat_interleave(expr.factor[0], 0).repeat_interleave(expr.factor[1], 1)
        out = _fit(out, expr.res)
    elif isinstance(expr, Pad):
        src = _as_float(_evaluate(expr.src, memo, base))
        mode = "constant" if expr.mode == "constant" else expr.mode
        out = F.pad(src, expr.pads, mode=mode)[0, 0] > 0
    elif isinstance(expr, Resize):
        src = _as_float(_evaluate(expr.src, memo, base))
        h, w = expr.res
        if h <= src.shape[-2] and w <= src.shape[-1]:
            out = F.adaptive_max_pool2d(src, expr.res)[0, 0] > 0
        else:
            out = F.interpolate(src, size=expr.res, mode="nearest")[0, 0] > 0
    elif isinstance(expr, Union_):
        parts = [_evaluate(s, memo, base) for s in expr.srcs]
        out = parts[0]
        for p in parts[1:]:
            out = out | p
    else:  # pragma: no cover - the dataclasses above are the whole language
        raise TypeError(f"unknown mask expression {expr!r}")
    memo[expr] = out
    return out


def _fit(mask: torch.Tensor, res: Resolution) -> torch.Tensor:
    """Crop or pad (inactive) to ``res``: pooling formulas can leave a ragged edge."""
    h, w = res
    mask = mask[:h, :w]
    if mask.shape != (h, w):
        mask = F.pad(mask, (0, w - mask.shape[1], 0, h - mask.shape[0]))
    return mask


def difference_mask(new: torch.Tensor, old: torch.Tensor, eps: float, res: Resolution) -> torch.Tensor:
    """The H x W pixels where ``new`` and ``old`` (N x C x H x W, or any shape ending in
    ``res``) differ by more than ``eps`` in some sample and channel: ``not |new - old| <= eps``,
    so NaN and infinite differences count as edited.

    The largest difference per pixel is compared once (``amax`` propagates NaN), instead of
    comparing every channel and reducing booleans: the same pixels, a third of the time.
    """
    diff = (new - old).reshape(-1, *res)
    diff.abs_()
    return ~(diff.amax(dim=0) <= eps)


def evaluate_masks(exprs: Iterable[MaskExpr], input_mask: torch.Tensor) -> dict:
    """Evaluate every expression on the H x W boolean ``input_mask``; returns ``{expr: mask}``."""
    memo: dict = {}
    for e in exprs:
        _evaluate(e, memo, input_mask)
    return memo


def grid_shape(res: Resolution, block: tuple[int, int]) -> tuple[int, int]:
    return (-(-res[0] // block[0]), -(-res[1] // block[1]))


def active_blocks(mask: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Indices ``(nb, 2)`` (row, col) of the blocks of ``block`` that hold an active pixel."""
    h, w = mask.shape
    gh, gw = grid_shape((h, w), block)
    padded = F.pad(mask, (0, gw * block[1] - w, 0, gh * block[0] - h))
    per_block = padded.view(gh, block[0], gw, block[1]).any(dim=3).any(dim=1)
    return per_block.nonzero().to(torch.int64)


def blocks_to_pixels(indices: torch.Tensor, block: tuple[int, int], res: Resolution) -> torch.Tensor:
    """Pixel map (H x W bool) covered by the given blocks, clipped to the resolution."""
    gh, gw = grid_shape(res, block)
    grid = torch.zeros(gh, gw, dtype=torch.bool, device=indices.device)
    if indices.numel():
        grid[indices[:, 0], indices[:, 1]] = True
    pixels = grid.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return pixels[: res[0], : res[1]]


def describe(expr: MaskExpr) -> str:
    """Short human-readable form for reports and dumps."""
    if isinstance(expr, InputMask):
        return "input"
    if isinstance(expr, Resampled):
        return f"sige@{expr.res[0]}x{expr.res[1]}"
    if isinstance(expr, Window):
        return f"rf({describe(expr.src)},k={expr.kernel[0]},s={expr.stride[0]})"
    if isinstance(expr, Upsample):
        return f"up{expr.factor[0]}({describe(expr.src)})"
    if isinstance(expr, Pad):
        return f"pad({describe(expr.src)})"
    if isinstance(expr, Resize):
        return f"resize({describe(expr.src)})@{expr.res[0]}x{expr.res[1]}"
    return f"union of {len(expr.srcs)}"


def pixel_fraction(masks: Mapping, expr: MaskExpr) -> float:
    m = masks[expr]
    return float(m.float().mean()) if m.numel() else 0.0
