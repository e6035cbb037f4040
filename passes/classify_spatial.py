"""Classify every value as image-like, derived or static, and match its op-table rule.

Writes ``SPATIAL`` (every node) and ``RULE`` (call_function nodes that depend on a spatial input).
Spatial inputs are ``ctx.settings.spatial_inputs`` or, by default, every 4-D floating placeholder
with height and width above 1. They may come at several resolutions when each divides the largest
by one integer factor (a ControlNet's latent and control image, a UNet's latent and the residuals
added into its skips): the input mask is given at the largest, and each smaller input's mask is
that mask reduced to its resolution (``propagate_masks``). A value depends on a spatial
input when any of its inputs does; it is IMAGE when it is a 4-D tensor with more than one pixel,
otherwise DERIVED. Nodes whose op has no rule, or whose rule declines, are recorded in
``ctx.fallbacks`` with the reason.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx import GraphModule, Node

from sigec.ir import meta_keys as K
from sigec.passes.op_table import OpKind, lookup
from sigec.passes.pass_base import PassContext, UserInputError, sigec_pass
from sigec.ir.plan import NCHW, NHWC, SpatialInfo, SpatialKind


class SpatialInputError(UserInputError):
    """The spatial inputs cannot be determined from the model and settings."""


def _tensor_val(node: Node) -> Optional[torch.Tensor]:
    v = node.meta.get("val")
    if isinstance(v, (tuple, list)) and v and isinstance(v[0], torch.Tensor):
        v = v[0]
    return v if isinstance(v, torch.Tensor) else None


def _is_image_shaped(v: Optional[torch.Tensor]) -> bool:
    return v is not None and v.dim() == 4 and (int(v.shape[-2]), int(v.shape[-1])) != (1, 1)


def _same_aspect(v: torch.Tensor, res: tuple[int, int]) -> bool:
    """Images keep the input's aspect ratio (within padding); token views (N, heads, H*W, d) do not."""
    ratio = (int(v.shape[-2]) * res[1]) / (int(v.shape[-1]) * res[0])
    return 0.8 <= ratio <= 1.25


def _image_info(node: Node, v: Optional[torch.Tensor], res: tuple[int, int]) -> Optional[SpatialInfo]:
    """Image info of a tainted value, or ``None`` when it is not image-like.

    Channels-last (NHWC) values are recognised only where a layout is known to flow: a
    ``permute(0, 2, 3, 1)`` of an NCHW image, and ops over NHWC images that keep H and W in place.
    """
    if v is None or v.dim() != 4:
        return None
    images = [n.meta[K.SPATIAL] for n in node.all_input_nodes if n.meta[K.SPATIAL].kind is SpatialKind.IMAGE]
    if node.op == "call_function" and node.target == torch.ops.aten.permute.default and images:
        dims = tuple(int(d) % 4 for d in node.args[1])
        layout = {(NCHW, (0, 2, 3, 1)): NHWC, (NHWC, (0, 3, 1, 2)): NCHW}.get((images[0].layout, dims))
        if layout is not None:
            return SpatialInfo(SpatialKind.IMAGE, images[0].resolution, layout)
    if any(i.layout == NHWC for i in images):
        nhwc = SpatialInfo(SpatialKind.IMAGE, None, NHWC)
        hw = nhwc.spatial_shape(v.shape)
        if any(i.layout == NHWC and i.resolution == hw for i in images):
            return SpatialInfo(SpatialKind.IMAGE, hw, NHWC)
        return None
    if _is_image_shaped(v) and _same_aspect(v, res):
        return SpatialInfo(SpatialKind.IMAGE, (int(v.shape[-2]), int(v.shape[-1])))
    return None


def _spatial_placeholders(gm: GraphModule, ctx: PassContext) -> list[Node]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = ctx.settings.spatial_inputs
    if names is not None:
        by_name = {n.name: n for n in placeholders}
        unknown = [s for s in names if s not in by_name]
        if unknown:
            raise SpatialInputError(f"spatial_inputs names {unknown} that are not inputs of the model; "
                                    f"inputs are {list(by_name)}")
        chosen = [by_name[s] for s in names]
    else:
        chosen = [n for n in placeholders
                  if _is_image_shaped(_tensor_val(n)) and _tensor_val(n).is_floating_point()]
    if not chosen:
        raise SpatialInputError("the model has no image input (a 4-D floating tensor with H and W > 1); "
                                "name the image inputs with spatial_inputs=(...)")
    resolutions = [tuple(int(d) for d in _tensor_val(n).shape[-2:]) for n in chosen]
    top = max(resolutions, key=lambda r: r[0] * r[1])
    for node, res in zip(chosen, resolutions):
        if not _divides(res, top):
            raise SpatialInputError(
                f"spatial input {node.name!r} is {res[0]}x{res[1]}, which is not {top[0]}x{top[1]} (the largest "
                "spatial input) divided by one integer factor; pass spatial_inputs=(...) naming the image inputs "
                "whose resolutions divide the largest")
    return chosen


def _divides(res: tuple[int, int], top: tuple[int, int]) -> bool:
    """``res`` is ``top`` divided by one integer factor in both dimensions."""
    factor = top[0] // res[0] if res[0] else 0
    return factor >= 1 and res[0] * factor == top[0] and res[1] * factor == top[1]


@sigec_pass(provides=(K.SPATIAL, K.RULE))
def classify_spatial(gm: GraphModule, ctx: PassContext) -> GraphModule:
    spatial = _spatial_placeholders(gm, ctx)
    ctx.spatial_inputs = tuple(n.name for n in spatial)
    # the largest input sets the resolution of the input mask (the others divide it)
    first = max((_tensor_val(n) for n in spatial), key=lambda v: int(v.shape[-2]) * int(v.shape[-1]))
    ctx.input_resolution = (int(first.shape[-2]), int(first.shape[-1]))
    ctx.batch = int(first.shape[0])
    spatial_set = set(spatial)
    for node in gm.graph.nodes:
        tainted = node in spatial_set or (
            node.op == "call_function"
            and any(n.meta[K.SPATIAL].tainted for n in node.all_input_nodes))
        v = _tensor_val(node)
        if not tainted:
            info = SpatialInfo(SpatialKind.STATIC)
        else:
            info = _image_info(node, v, ctx.input_resolution) or SpatialInfo(SpatialKind.DERIVED)
        node.meta[K.SPATIAL] = info
        if node.op != "call_function" or not tainted:
            continue
        rule = lookup(node.target)
        reason = None
        if rule is None:
            reason = f"no sparse rule for {node.target}"
        elif rule.kind not in (OpKind.IGNORED, OpKind.PROJECTION):
            if info.kind is not SpatialKind.IMAGE:
                reason = "output is not image-like"
            else:
                reason = rule.supports(node) or _operands_unsupported(node, rule, info)
        if reason is not None:
            rule = None
            ctx.fallbacks[node.name] = reason
        node.meta[K.RULE] = rule
    return gm


def _operands_unsupported(node: Node, rule, info: SpatialInfo) -> Optional[str]:
    """Image operands must match the output resolution; others must broadcast over space."""
    operands = list(_flat_nodes(node.args)) + list(_flat_nodes(node.kwargs.values()))
    if rule.spatial_args is not None:
        spatial = set(_flat_nodes([node.args[i] for i in rule.spatial_args if i < len(node.args)]))
        if any(op.meta[K.SPATIAL].tainted for op in operands if op not in spatial):
            return "depends on a spatial value through a non-spatial argument"
    if rule.kind is OpKind.LOCAL:
        src = node.args[0].meta[K.SPATIAL]
        if src.kind is not SpatialKind.IMAGE:
            return "input is not image-like"
        return None if src.layout == NCHW else "channels-last input to a spatial op"
    for op in operands:
        s = op.meta[K.SPATIAL]
        if rule.spatial_args is not None and not s.tainted:
            continue  # weights, statistics and scalars of ops with designated image arguments
        if s.kind is SpatialKind.IMAGE:
            if s.resolution != info.resolution:
                return f"mixes resolutions {s.resolution} and {info.resolution}"
        elif s.kind is SpatialKind.DERIVED:
            return "combines an image with a value derived from the whole image"
        else:
            v = _tensor_val(op)
            if v is None or v.dim() == 0:
                continue
            padded = [1] * (4 - v.dim()) + list(v.shape)
            hw = info.spatial_shape(padded) if v.dim() <= 4 else (0, 0)
            if info.layout == NHWC and hw != (1, 1):
                return f"operand {op.name} of shape {tuple(v.shape)} varies over space in a channels-last value"
            if hw != (1, 1) and not (v.dim() == 4 and hw == info.resolution):
                return f"operand {op.name} of shape {tuple(v.shape)} varies over space in a way blocks cannot follow"
    return None


def _flat_nodes(args):
    for a in args:
        if isinstance(a, Node):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from _flat_nodes(a)
