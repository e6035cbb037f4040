import torch
import torch.nn as nn
import torch.nn.functional as F

from sigec.ir import meta_keys as K
from sigec.passes.op_table import WindowSpec
from tests.passes.helpers import analyse, node


class Geometry(nn.Module):
    def __init__(self):
        super().__init__()
        self.c3 = nn.Conv2d(2, 2, 3, padding=1)
        self.c5 = nn.Conv2d(2, 2, 5, stride=2, padding=4, dilation=2)

    def forward(self, x):
        h = self.c5(self.c3(x))
        return F.interpolate(h, scale_factor=2.0, mode="bilinear") + x


def test_windows_follow_conv_arithmetic():
    gm, _ = analyse(Geometry(), (torch.randn(1, 2, 16, 16),), until="analyze_halo", block_size=4)
    assert node(gm, "conv2d").meta[K.WINDOW] == WindowSpec((4, 4), (6, 6), (4, 4), (-1, -1))
    # stride 2, dilation 2, kernel 5: window (4-1)*2 + 2*4 + 1 = 15, blocks start 8 apart at -4
    assert node(gm, "conv2d_1").meta[K.WINDOW] == WindowSpec((4, 4), (15, 15), (8, 8), (-4, -4))
    assert node(gm, "conv2d_1").meta[K.WINDOW].halo == (7, 7)
    up = node(gm, "upsample_bilinear2d").meta[K.WINDOW]
    assert up == WindowSpec((4, 4), (4, 4), (2, 2), (-1, -1), "replicate", 0.0, (2, 2))
    assert node(gm, "add").meta[K.WINDOW].is_identity


def test_block_not_multiple_of_upsampling_factor_falls_back():
    gm, ctx = analyse(Geometry(), (torch.randn(1, 2, 18, 18),), until="analyze_halo", block_size=3)
    assert node(gm, "upsample_bilinear2d").meta[K.RULE] is None
    assert "multiple of the up-sampling factor" in ctx.fallbacks["upsample_bilinear2d"]


def test_block_size_clipped_to_resolution_and_per_resolution_mapping():
    gm, _ = analyse(Geometry(), (torch.randn(1, 2, 16, 16),), until="analyze_halo", block_size={16: 8, 8: 2})
    assert node(gm, "conv2d").meta[K.GRID] == (8, 8)
    assert node(gm, "conv2d_1").meta[K.GRID] == (2, 2)


class UpFromLow(nn.Module):
    """4x4 -> 8x8 nearest up-sampling then a convolution: automatic blocks at 8x8 would be 1 pixel."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(2, 2, 3, stride=2, padding=1)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(self.down(x), scale_factor=2.0, mode="nearest"))


def test_automatic_blocks_are_multiples_of_the_up_sampling_factor():
    gm, ctx = analyse(UpFromLow(), (torch.randn(1, 2, 8, 8),), until="analyze_halo")
    up = node(gm, "upsample_nearest2d")
    assert up.meta[K.GRID] == (2, 2) and node(gm, "conv2d_1").meta[K.GRID] == (2, 2)
    assert up.meta[K.RULE] is not None and not ctx.fallbacks
    assert node(gm, "conv2d").meta[K.GRID] == (1, 1)  # 4x4: nothing there needs more
    # a size the user gives is kept, and the up-sampling falls back with the reason
    gm, ctx = analyse(UpFromLow(), (torch.randn(1, 2, 8, 8),), until="analyze_halo", block_size=1)
    assert node(gm, "upsample_nearest2d").meta[K.RULE] is None
    assert "multiple of the up-sampling factor 2" in ctx.fallbacks["upsample_nearest2d"]
