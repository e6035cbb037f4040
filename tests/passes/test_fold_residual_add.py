import torch
import torch.nn as nn

import sigec
from sigec.core.codegen import emit_incremental
from sigec.passes import fold_residual_add
from sigec.passes.verifier import verify_incremental
from tests.passes.helpers import analyse, nodes_by_target

ops = torch.ops.sigec
aten = torch.ops.aten


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + x  # under exact the conv's mask is larger than x's: x is gathered


def test_gather_plus_add_folds_into_residual_add():
    gm, ctx = analyse(Residual(), (torch.randn(1, 3, 16, 16),), policy="exact", block_size=4)
    inc, _ = emit_incremental(gm, ctx.batch)
    assert len(nodes_by_target(inc, aten.add.Tensor)) == 1
    folded = fold_residual_add(inc, ctx)
    verify_incremental(folded)
    assert len(nodes_by_target(folded, ops.residual_add.default)) == 1
    assert not nodes_by_target(folded, aten.add.Tensor)


def test_add_of_two_block_tensors_is_left_alone():
    class TwoConvs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.a(x) + self.b(x)

    gm, ctx = analyse(TwoConvs(), (torch.randn(1, 3, 16, 16),), block_size=4)
    inc, _ = emit_incremental(gm, ctx.batch)
    folded = fold_residual_add(inc, ctx)
    assert not nodes_by_target(folded, ops.residual_add.default)


def test_numerics():
    model = Residual().eval()
    x = torch.randn(1, 3, 16, 16)
    engine = sigec.compile(model, (x,), policy="exact", block_size=4)
    engine(x)
    x2 = x.clone()
    x2[..., 0:2, 0:2] = 1
    torch.testing.assert_close(engine(x2), model(x2), rtol=1e-4, atol=1e-5)
