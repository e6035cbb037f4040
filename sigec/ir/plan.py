"""The analysis results stored in ``node.meta`` (keys in ``sigec.ir.meta_keys``)."""
from __future__ import annotations

import dataclasses
import enum
from typing import Optional

import torch
from torch.fx import Node

from sigec.ir import meta_keys as K


class SpatialKind(enum.Enum):
    IMAGE = "image"      #: (N, C, H, W) value that depends on a spatial input
    DERIVED = "derived"  #: depends on a spatial input but is not image-like (tokens, pooled vectors)
    STATIC = "static"    #: does not depend on any spatial input (weights, timestep embeddings)


#: Memory layouts an image value can have: channels at dim 1, or last (after a permute, as
#: around a channels-last LayerNorm).
NCHW, NHWC = "nchw", "nhwc"


@dataclasses.dataclass(frozen=True)
class SpatialInfo:
    kind: SpatialKind
    resolution: Optional[tuple[int, int]] = None
    layout: str = NCHW

    @property
    def tainted(self) -> bool:
        return self.kind is not SpatialKind.STATIC

    @property
    def channel_dim(self) -> int:
        return 1 if self.layout == NCHW else 3

    def spatial_shape(self, shape) -> tuple[int, int]:
        """(H, W) of a tensor shape in this layout."""
        return (int(shape[2]), int(shape[3])) if self.layout == NCHW else (int(shape[1]), int(shape[2]))


class DecisionKind(enum.Enum):
    SPARSE = "sparse"      #: computed on the active blocks only
    DENSE = "dense"        #: supported, but the cost model prefers the whole tensor
    FALLBACK = "fallback"  #: no sparse rule: dense on materialized inputs, taken inside its mask
    STATIC = "static"      #: independent of the edit: recomputed as in the dense model


@dataclasses.dataclass(frozen=True)
class Decision:
    kind: DecisionKind
    reason: str = ""
    #: the cost model's ``(sparse, dense)`` estimate in seconds, for the ops it priced
    estimate: Optional[tuple[float, float]] = None


@dataclasses.dataclass(frozen=True)
class GatherPrologue:
    """A norm affine and/or activation evaluated inside the gather that feeds a local op.

    ``source`` is the tensor gathered; ``norm`` the NORM node whose frozen affine applies (or
    ``None``); ``activation``/``slope`` the activation applied after it.
    """

    source: Node
    norm: Optional[Node]
    activation: str
    slope: float


def is_image(node) -> bool:
    """An image-like value (N, C, H, W) that depends on a spatial input."""
    return isinstance(node, Node) and node.meta[K.SPATIAL].kind is SpatialKind.IMAGE


def needs_select(node: Node) -> bool:
    """A fallback image whose value leaves its fallback region (or the graph) is masked."""
    if node.meta[K.DECISION].kind is not DecisionKind.FALLBACK or not is_image(node):
        return False
    if not isinstance(node.meta.get("val"), torch.Tensor):
        return False
    return any(u.op == "output" or u.meta[K.DECISION].kind is not DecisionKind.FALLBACK for u in node.users)
