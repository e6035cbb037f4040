import pytest
import torch
import torch.nn as nn

import sigec
from sigec.core.codegen import emit_incremental
from sigec.passes import INCREMENTAL_PASSES, drop_identity_ops, fold_into_affine
from sigec.passes.verifier import verify_incremental
from sigec.spatial import build as spatial_build
from tests.passes.helpers import analyse, nodes_by_target

ops = torch.ops.sigec
aten = torch.ops.aten


class TimeResBlock(nn.Module):
    """diffusers' ResnetBlock2D: conv, + timestep embedding, group norm, SiLU, eval dropout, conv."""

    def __init__(self, also_return: str = ""):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
        self.temb = nn.Linear(5, 8)
        self.norm = nn.GroupNorm(2, 8)
        self.drop = nn.Dropout(0.0)
        self.also_return = also_return

    def forward(self, x, t):
        h = self.conv1(x) + self.temb(t)[:, :, None, None]
        n = self.norm(h)
        a = torch.nn.functional.silu(n)
        y = self.conv2(self.drop(a)) + x
        extra = {"add": h, "norm": n}.get(self.also_return)
        return (y, extra) if extra is not None else y


def _incremental(model, batch):
    args = (torch.randn(batch, 4, 16, 16), torch.randn(batch, 5))
    gm, ctx = analyse(model.eval(), args, block_size=4)
    inc, _ = emit_incremental(gm, ctx.batch)
    ctx.dense_graph = gm
    return drop_identity_ops(inc, ctx), ctx


@pytest.mark.parametrize("batch", [1, 2])
def test_channel_add_and_activation_fold_into_the_affine(batch):
    inc, ctx = _incremental(TimeResBlock(), batch)
    (affine,) = nodes_by_target(inc, ops.affine_act.default)
    assert affine.args[3] == "none" and nodes_by_target(inc, aten.silu.default)
    out = fold_into_affine(inc, ctx)
    verify_incremental(out)
    (affine,) = nodes_by_target(out, ops.affine_act.default)
    assert affine.args[3] == "silu" and not nodes_by_target(out, aten.silu.default)
    assert affine.args[0].target == ops.conv_windows.default  # the conv's blocks, without the add
    assert not nodes_by_target(out, ops.tile_blocks.default)
    shift = affine.args[2]
    assert shift.target == aten.add.Tensor and shift.args[1].target == aten.mul.Tensor


@pytest.mark.parametrize("also_return,left", [("add", "add"), ("norm", "silu")])
def test_values_with_other_readers_are_not_folded(also_return, left):
    inc, ctx = _incremental(TimeResBlock(also_return), 1)
    out = fold_into_affine(inc, ctx)
    (affine,) = nodes_by_target(out, ops.affine_act.default)
    if left == "add":  # the sum is returned: it stays, the activation still folds
        assert affine.args[0].target == aten.add.Tensor and affine.args[3] == "silu"
    else:  # the normalized value is returned: the activation stays, the add still folds
        assert affine.args[3] == "none" and nodes_by_target(out, aten.silu.default)
        assert affine.args[0].target == ops.conv_windows.default


@pytest.mark.parametrize("batch", [1, 2])
def test_engine_output_is_unchanged_by_the_fold(batch, monkeypatch):
    # group-norm statistics are frozen at the recording, so the oracle is the same engine with
    # the incremental graph left unfolded
    model = TimeResBlock().eval()
    x, t = torch.randn(batch, 4, 16, 16), torch.randn(batch, 5)
    x2 = x.clone()
    x2[..., 5:9, 3:6] += 1.0

    def edited_output():
        engine = sigec.compile(model, (x, t), block_size=4)
        engine(x, t)
        return engine(x2, t)

    folded = edited_output()
    monkeypatch.setattr(spatial_build, "INCREMENTAL_PASSES", [p for p in INCREMENTAL_PASSES if p is not fold_into_affine])
    torch.testing.assert_close(folded, edited_output(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(folded, model(x, t))  # the edit did reach the output
