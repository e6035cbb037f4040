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

import operator
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from sigec.ir import meta_keys as K
from sigec.ir.plan import NCHW, SpatialKind
from sigec.passes.op_table import OpKind, arg, lookup
from sigec.passes.pass_base import PassContext, UserInputError, sigec_pass
from sigec.passes.tile_geometry import (BilinearGeometry, ConvGeometry, ConvTransposeGeometry, GatherGeometry,
                                        NormGeometry, Role, TileKind, TileRule, int_pair, repeat_factor,
                                        tensor_value)

aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------
# per-op classification


def _conv_geometry(node: Node) -> "ConvGeometry | ConvTransposeGeometry | str":
    w = tensor_value(node.args[1])
    if w is None or w.dim() != 4:
        return "not a 2-D convolution"
    kernel = (int(w.shape[2]), int(w.shape[3]))
    if node.target == aten.convolution.default:
        stride, padding, dilation = int_pair(node.args[3], 1), int_pair(node.args[4], 0), int_pair(node.args[5], 1)
        if node.args[6]:
            return ConvTransposeGeometry(kernel, stride, padding, dilation)
        return ConvGeometry(kernel, stride, padding, dilation, "conv")
    stride, dilation = int_pair(arg(node, 3, "stride", 1), 1), int_pair(arg(node, 5, "dilation", 1), 1)
    if node.target == aten.conv_transpose2d.input:
        padding = int_pair(arg(node, 4, "padding", 0), 0)
        dilation = int_pair(arg(node, 7, "dilation", 1), 1)
        return ConvTransposeGeometry(kernel, stride, padding, dilation)
    pad = arg(node, 4, "padding", 0)
    if isinstance(pad, str):  # "same" pads total d*(k-1), the smaller half first
        padding = (0, 0) if pad == "valid" else tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    else:
        padding = int_pair(pad, 0)
    return ConvGeometry(kernel, stride, padding, dilation, "conv")


def _pool_geometry(node: Node) -> "ConvGeometry | str":
    kernel = int_pair(node.args[1], 1)
    stride = int_pair(arg(node, 2, "stride", None), 1) if arg(node, 2, "stride", None) else kernel
    padding = int_pair(arg(node, 3, "padding", 0), 0)
    if node.target == aten.max_pool2d.default:
        # ceil_mode only adds windows that run past the border, which -inf padding reproduces
        return ConvGeometry(kernel, stride, padding, int_pair(arg(node, 4, "dilation", 1), 1), "max_pool")
    if arg(node, 4, "ceil_mode", False):
        return "avg_pool2d with ceil_mode divides border windows by fewer pixels"
    if not arg(node, 5, "count_include_pad", True) and any(padding):
        return "avg_pool2d with count_include_pad=False and padding divides border windows by fewer pixels"
    return ConvGeometry(kernel, stride, padding, (1, 1), "avg_pool")


def _hw(node) -> tuple[int, int]:
    v = tensor_value(node)
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
    repeats = (0, 0) if fill is not None else tuple(repeat_factor(m) for m in maps)
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
    x = tensor_value(node.args[0])
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
        v = tensor_value(op)
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
        roles = (Role.IMAGE,) + tuple(Role.SPATIAL if tensor_value(i) is not None and tensor_value(i).dim() >= 2 else Role.WHOLE
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
    if node.target in _VIEWS and tensor_value(node) is not None and tensor_value(node.args[0]) is not None \
            and tuple(tensor_value(node).shape) == tuple(tensor_value(node.args[0]).shape):
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
    v = tensor_value(operand)
    if v is None or v.dim() == 0:
        return True
    padded = [1] * max(0, 4 - v.dim()) + list(v.shape)[-4:]
    return out_info.spatial_shape(padded) == (1, 1)


@sigec_pass(requires=(K.SPATIAL,), provides=(K.TILE,))
def classify_tiling(gm: GraphModule, ctx: PassContext) -> GraphModule:
    # one tile grid covers the image: spatial inputs at several resolutions would need one per size
    smaller = [n.name for n in gm.graph.nodes if n.op == "placeholder" and n.meta[K.SPATIAL].kind is SpatialKind.IMAGE
               and n.meta[K.SPATIAL].resolution != tuple(ctx.input_resolution)]
    if smaller:
        raise UserInputError(f"tiling needs every spatial input at one resolution, but {smaller} are smaller than "
                             f"{tuple(ctx.input_resolution)}; pass spatial_inputs=(...) naming those of one resolution")
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        node.meta[K.TILE] = classify_node(node)
    return gm
