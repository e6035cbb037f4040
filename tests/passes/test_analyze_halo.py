import torch
import torch.nn as nn
import torch.nn.functional as F

from sigec.ir import meta_keys as K
from sigec.ir.settings import SMALL_EDIT, CompileSettings
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


def test_an_up_sampling_takes_blocks_of_whole_input_pixels_and_the_ops_around_it_keep_theirs():
    gm, ctx = analyse(Geometry(), (torch.randn(1, 2, 18, 18),), until="analyze_halo", block_size=3)
    up = node(gm, "upsample_bilinear2d")
    assert up.meta[K.GRID] == (4, 4) and up.meta[K.RULE] is not None and not ctx.fallbacks
    assert up.meta[K.WINDOW] == WindowSpec((4, 4), (4, 4), (2, 2), (-1, -1), "replicate", 0.0, (2, 2))
    assert node(gm, "add").meta[K.GRID] == (3, 3) and node(gm, "conv2d").meta[K.GRID] == (3, 3)


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


def test_only_the_up_sampling_is_raised_to_its_factor():
    for block_size in (None, 1):  # automatic (1 pixel at 8x8 and 4x4) or given
        gm, ctx = analyse(UpFromLow(), (torch.randn(1, 2, 8, 8),), until="analyze_halo", block_size=block_size)
        up = node(gm, "upsample_nearest2d")
        assert up.meta[K.GRID] == (2, 2) and up.meta[K.RULE] is not None and not ctx.fallbacks
        assert node(gm, "conv2d_1").meta[K.GRID] == (1, 1) and node(gm, "conv2d").meta[K.GRID] == (1, 1)


def test_the_plan_for_small_edits_takes_blocks_half_as_wide():
    settings = CompileSettings()
    small, large = settings.for_plan(SMALL_EDIT), settings.for_plan(0.05)
    assert [small.block_for(r, r) for r in (256, 64, 32, 8)] == [(8, 8), (2, 2), (1, 1), (1, 1)]
    assert [large.block_for(r, r) for r in (256, 64, 32, 8)] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    # the analysis of each plan's graph uses its own grid
    for fraction, grid in ((0.01, (2, 2)), (0.2, (4, 4))):
        gm, _ = analyse(Geometry(), (torch.randn(1, 2, 64, 64),), until="analyze_halo", expected_active_fraction=fraction)
        assert node(gm, "conv2d").meta[K.GRID] == grid
