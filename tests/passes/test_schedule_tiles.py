"""schedule_tiles: grid partition, whole resolutions, phases, holds, halos."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sigec.ir import meta_keys as K
from sigec.core.capture import capture
from sigec.passes import TILING_PASSES, run_passes
from sigec.passes.tile_plan import TileGrid, TilingContext, TilingError, halos
from sigec.ir.settings import CompileSettings
from tests.passes.helpers import node


def schedule(model, x, **settings):
    ctx = TilingContext(CompileSettings(), **settings)
    gm = run_passes(capture(model.eval(), (x,)).gm, ctx, TILING_PASSES)
    return gm, ctx


class TwoNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))
        self.n1, self.n2 = nn.GroupNorm(2, 4), nn.GroupNorm(2, 4)

    def forward(self, x):
        h = self.c1(x)
        h = self.c2(F.silu(self.n1(h)))
        return self.c3(F.silu(self.n2(h))) + x


@pytest.mark.parametrize("size,tiles", [((32, 32), (4, 4)), ((30, 17), (4, 3)), ((8, 8), (8, 1))])
def test_owned_regions_partition_every_resolution(size, tiles):
    grid = TileGrid.split(size, tiles=tiles)
    for res in [size, (size[0] // 2, size[1] // 2), (size[0] * 2, size[1] * 2)]:
        cover = torch.zeros(res, dtype=torch.int32)
        for t in grid.tiles():
            (r0, r1), (c0, c1) = grid.owned(res, t)
            cover[r0:r1, c0:c1] += 1
        assert bool((cover == 1).all())
    assert TileGrid.split((10, 7), tile_size=4).rows == (0, 4, 8, 10)


def test_each_norm_adds_a_phase_and_statistics_come_first():
    gm, ctx = schedule(TwoNorms(), torch.randn(1, 4, 16, 16), tiles=(2, 2), whole_below_bytes=0)
    phase = lambda name: node(gm, name).meta[K.SCHEDULE].phase  # noqa: E731
    assert phase("conv2d") == 0 and phase("group_norm") == 1 and phase("conv2d_1") == 1
    assert phase("group_norm_1") == 2 and ctx.plan.phases == 3
    assert [n.name for n in ctx.plan.stats_of[node(gm, "conv2d")]] == ["group_norm"]
    # the input x is read by the last phase's residual add: a source, never held
    assert node(gm, "x").meta[K.SCHEDULE].mode == "source"


class Wide(nn.Module):
    """A wide value between two norms, computed from a narrow input: cheaper to recompute than to hold."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 32, 3, padding=1), nn.Conv2d(32, 2, 3, padding=1)
        self.n1, self.n2 = nn.GroupNorm(4, 32), nn.GroupNorm(1, 2)

    def forward(self, x):
        return F.silu(self.n2(self.c2(F.silu(self.n1(self.c1(x))))))


def test_holding_everything_and_recomputing_to_fit():
    x = torch.randn(1, 2, 64, 64)
    _, hold = schedule(Wide(), x, tiles=(2, 2), whole_below_bytes=0, budget_bytes=2**30, on_full="raise")
    assert {n.name for n in hold.plan.held} >= {"conv2d"} and not [n for n in hold.plan.dropped
                                                                    if n.name.startswith("conv")]
    _, free = schedule(Wide(), x, tiles=(2, 2), whole_below_bytes=0)
    path = free.plan.path  # (dropped count, estimated MACs, estimated peak) along the greedy
    assert len(path) > 1 and path[-1][2] < path[0][2] and path[-1][1] > path[0][1]
    _, fit = schedule(Wide(), x, tiles=(2, 2), whole_below_bytes=0, budget_bytes=path[-1][2])
    assert fit.plan.estimated_peak_bytes <= path[-1][2] < hold.plan.estimated_peak_bytes
    assert any(n.name.startswith("conv") for n in fit.plan.dropped)
    assert fit.plan.estimated_macs > hold.plan.estimated_macs


def test_small_resolutions_run_whole():
    class Down(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=4, padding=1)

        def forward(self, x):
            return self.a(x) + F.interpolate(self.b(x), scale_factor=4.0)

    gm, ctx = schedule(Down(), torch.randn(1, 4, 32, 32), tiles=(2, 2))
    assert node(gm, "conv2d_1").meta[K.SCHEDULE].mode == "whole"  # 8x8: 1/16 of the largest value
    assert "within one tile's share" in node(gm, "conv2d_1").meta[K.SCHEDULE].reason
    assert node(gm, "conv2d").meta[K.SCHEDULE].mode == "tiled"
    assert ctx.whole_resolutions == {(32, 32): False, (8, 8): True}


def test_lower_resolution_with_tiles_smaller_than_the_halo_runs_whole():
    from sigec.models import label_map, spade_generator

    gm, ctx = schedule(spade_generator(), label_map(8, 128), tiles=(4, 4))
    reasons = {n.meta[K.SCHEDULE].reason for n in gm.graph.nodes if n.op == "call_function"}
    assert any("smaller than the" in r and "halo" in r for r in reasons)
    (bottom, _), = [(r, w) for r, w in ctx.whole_resolutions.items() if r == (128, 128)]
    assert not ctx.whole_resolutions[bottom]
    for n, (hh, hw) in halos(ctx.plan).items():
        res = n.meta[K.SPATIAL].resolution
        assert hh <= res[0] // 4 and hw <= res[1] // 4


def test_no_image_output():
    with pytest.raises(TilingError, match="no image output"):
        schedule(nn.Sequential(nn.Conv2d(4, 4, 3), nn.Flatten()), torch.randn(1, 4, 8, 8), tiles=(2, 2))
