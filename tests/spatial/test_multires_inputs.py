"""Spatial inputs at several resolutions (a ControlNet's latent and control image, a UNet's latent
and the residuals added into its skips): the input mask is at the largest, the smaller inputs see
it reduced, and edits of any of them are recomputed exactly under ``exact``."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import sigec
from sigec.ir import meta_keys as K


class Skips(nn.Module):
    """A 16x16 image plus residuals at 16, 8 and 4 added after each down-sampling stage (the way
    a ControlNet's outputs enter a UNet), then up again."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Conv2d(3, 8, 3, padding=1)
        self.down1 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.down2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.up = nn.Conv2d(8, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x, r16, r8, r4):
        h16 = F.silu(self.inp(x)) + r16
        h8 = F.silu(self.down1(h16)) + r8
        h4 = F.silu(self.down2(h8)) + r4
        u8 = F.interpolate(h4, scale_factor=2.0) + h8
        u16 = F.interpolate(F.silu(self.up(u8)), scale_factor=2.0) + h16
        return self.out(u16)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 3, 16, 16, generator=g), torch.randn(1, 8, 16, 16, generator=g),
            torch.randn(1, 8, 8, 8, generator=g), torch.randn(1, 8, 4, 4, generator=g))


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    model = Skips().eval()
    return model, sigec.compile(model, _inputs(), policy="exact")


def test_every_input_is_spatial_at_its_own_resolution(engine):
    _, eng = engine
    assert eng.context.spatial_inputs == ("x", "r16", "r8", "r4")
    assert eng.context.input_resolution == (16, 16)
    res = {n.name: n.meta[K.SPATIAL].resolution for n in eng.graph_module.graph.nodes if n.op == "placeholder"}
    assert res == {"x": (16, 16), "r16": (16, 16), "r8": (8, 8), "r4": (4, 4)}


@settings(max_examples=12, deadline=None)
@given(which=st.integers(0, 3), y=st.integers(0, 3), x=st.integers(0, 3))
def test_edit_of_any_input_equals_dense(engine, which, y, x):
    model, eng = engine
    inputs = _inputs()
    with eng.slot("multires"):
        eng(*inputs)
        edited = [t.clone() for t in inputs]
        edited[which][..., y, x] += 1.0  # one pixel of one input, at that input's resolution
        out = eng(*edited)
    stats = eng.last_stats["input_mask"]
    # the mask is at the largest resolution: one pixel of the 4x4 input covers a 4x4 block of it
    side = 16 // edited[which].shape[-1]
    assert int(stats.sum()) == side * side
    with torch.no_grad():
        torch.testing.assert_close(out, model(*edited), rtol=1e-5, atol=1e-5)


def test_explicit_mask_reduces_to_the_smaller_inputs(engine):
    model, eng = engine
    inputs = _inputs(1)
    edited = [t.clone() for t in inputs]
    edited[3][..., 1, 2] += 2.0  # the 4x4 residual at (1, 2): pixels 4..7 x 8..11 at 16x16
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[5, 9] = True  # one pixel inside that block: the reduced mask covers the residual's pixel
    with eng.slot("explicit"):
        eng(*inputs)
        out = eng(*edited, mask=mask)
    with torch.no_grad():
        torch.testing.assert_close(out, model(*edited), rtol=1e-5, atol=1e-5)


def test_sige_policy_runs_and_keeps_outside(engine):
    model, _ = engine
    eng = sigec.compile(model, _inputs(), policy="sige")
    inputs = _inputs(2)
    eng(*inputs)
    edited = [t.clone() for t in inputs]
    edited[2][..., 0, 0] += 1.0
    out = eng(*edited)
    with torch.no_grad():
        dense, base = model(*edited), model(*inputs)
    changed = (dense - base).abs().amax(dim=(0, 1)) > 1e-6
    # recomputed where the edit reaches, unchanged far from it
    assert torch.allclose(out[..., ~changed], base[..., ~changed], atol=1e-6)
    assert (out - base).abs().amax() > 1e-3


def test_tiling_refuses_inputs_at_several_resolutions():
    from sigec.passes.pass_base import UserInputError
    with pytest.raises(UserInputError, match="one resolution"):
        sigec.compile(Skips().eval(), _inputs(), tiles=(2, 2))
