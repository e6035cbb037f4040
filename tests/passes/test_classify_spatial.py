import pytest
import torch
import torch.nn as nn

from sigec.ir import meta_keys as K
from sigec.passes.classify_spatial import SpatialInputError
from sigec.passes.op_table import OpKind
from sigec.ir.plan import SpatialKind
from tests.passes.helpers import analyse, node

aten = torch.ops.aten


class WithEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.emb = nn.Linear(1, 4)

    def forward(self, x, t):
        e = self.emb(t[:, None].float())[:, :, None, None]
        h = self.conv(x) + e
        pooled = h.mean(dim=(2, 3))
        return h, pooled


def test_images_static_and_derived_values():
    gm, ctx = analyse(WithEmbedding(), (torch.randn(1, 3, 8, 8), torch.tensor([3])), until="classify_spatial")
    assert ctx.spatial_inputs == ("x",) and ctx.input_resolution == (8, 8)
    kinds = {n.name: n.meta[K.SPATIAL].kind for n in gm.graph.nodes}
    assert kinds["x"] is SpatialKind.IMAGE and kinds["t"] is SpatialKind.STATIC
    assert kinds["conv2d"] is SpatialKind.IMAGE
    assert kinds["linear"] is SpatialKind.STATIC  # the timestep embedding never sees the image
    assert kinds["mean"] is SpatialKind.DERIVED
    assert node(gm, "conv2d").meta[K.RULE].kind is OpKind.LOCAL
    assert node(gm, "add").meta[K.RULE].kind is OpKind.POINTWISE
    assert node(gm, "mean").meta[K.RULE] is None  # spatial reduction: fallback
    assert "mean" in ctx.fallbacks


def test_token_views_are_not_images():
    class Tokens(nn.Module):
        def forward(self, x):
            n, c, h, w = x.shape
            t = x.view(n, c, h * w).transpose(1, 2)  # (N, HW, C)
            heads = t.reshape(n, h * w, 2, c // 2).transpose(1, 2)  # (N, 2, HW, C/2): 4-D, not an image
            return heads.sum()

    gm, _ = analyse(Tokens(), (torch.randn(1, 4, 8, 8),), until="classify_spatial")
    assert node(gm, "transpose_1").meta[K.SPATIAL].kind is SpatialKind.DERIVED


def test_explicit_spatial_inputs_and_errors():
    class Two(nn.Module):
        def forward(self, a, b):
            return a + b

    args = (torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8))
    gm, ctx = analyse(Two(), args, until="classify_spatial", spatial_inputs=("a",))
    assert ctx.spatial_inputs == ("a",)
    with pytest.raises(SpatialInputError, match="not inputs of the model"):
        analyse(Two(), args, until="classify_spatial", spatial_inputs=("nope",))
    class TwoRes(nn.Module):
        def forward(self, a, b):
            return a + nn.functional.interpolate(b, scale_factor=2.0)

    class Pair(nn.Module):
        def forward(self, a, b):
            return a * 2, b * 2

    # a smaller input whose size divides the largest is spatial, with its own resolution
    gm, ctx = analyse(TwoRes(), (torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4)), until="classify_spatial")
    assert ctx.spatial_inputs == ("a", "b") and ctx.input_resolution == (8, 8)
    assert node(gm, "b").meta[K.SPATIAL].resolution == (4, 4)
    with pytest.raises(SpatialInputError, match="divided by one integer factor"):
        analyse(Pair(), (torch.randn(1, 2, 9, 9), torch.randn(1, 2, 4, 4)), until="classify_spatial")
    with pytest.raises(SpatialInputError, match="no image input"):
        analyse(nn.Linear(3, 3), (torch.randn(2, 3),), until="classify_spatial")


def test_operand_that_varies_over_space_is_a_fallback():
    class RowScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.row = nn.Parameter(torch.randn(8, 1))  # broadcasts over H only

        def forward(self, x):
            return x * self.row

    gm, ctx = analyse(RowScale(), (torch.randn(1, 2, 8, 8),), until="classify_spatial")
    assert node(gm, "mul").meta[K.RULE] is None and "varies over space" in ctx.fallbacks["mul"]


def test_idempotent():
    gm, ctx = analyse(WithEmbedding(), (torch.randn(1, 3, 8, 8), torch.tensor([3])), until="classify_spatial")
    from sigec.passes import classify_spatial
    before = {n.name: n.meta[K.SPATIAL] for n in gm.graph.nodes}
    classify_spatial(gm, ctx)
    assert before == {n.name: n.meta[K.SPATIAL] for n in gm.graph.nodes}
