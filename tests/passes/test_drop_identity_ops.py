import torch
import torch.nn as nn

import sigec
from sigec.core.codegen import emit_incremental
from sigec.passes import drop_identity_ops
from sigec.passes.verifier import verify_incremental
from tests.passes.helpers import analyse, nodes_by_target

aten = torch.ops.aten


class Scaled(nn.Module):
    """diffusers' shape: ``(x + h) / output_scale_factor`` with a factor of 1, and eval dropout."""

    def __init__(self, factor: float = 1.0):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.drop = nn.Dropout(0.1)
        self.factor = factor

    def forward(self, x):
        h = self.drop(self.a(x)) * 1.0
        return self.b((x + h) / self.factor) + 0.0


def _incremental(model, x):
    gm, ctx = analyse(model.eval(), (x,), policy="exact", block_size=4)
    inc, _ = emit_incremental(gm, ctx.batch)
    ctx.dense_graph = gm
    return inc, ctx


def test_division_and_multiplication_by_one_and_eval_dropout_are_dropped():
    inc, ctx = _incremental(Scaled(), torch.randn(1, 3, 16, 16))
    targets = (aten.dropout.default, aten.div.Tensor, aten.mul.Tensor)
    assert all(nodes_by_target(inc, t) for t in targets)
    out = drop_identity_ops(inc, ctx)
    verify_incremental(out)
    assert not any(nodes_by_target(out, t) for t in targets)
    assert nodes_by_target(out, aten.add.Tensor)  # + 0.0 is not the identity for -0.0: kept


def test_other_factors_and_dtype_changes_are_kept():
    inc, ctx = _incremental(Scaled(factor=2.0), torch.randn(1, 3, 16, 16))
    assert len(nodes_by_target(drop_identity_ops(inc, ctx), aten.div.Tensor)) == 1

    class ToFloat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv((x > 0).long() / 1)  # an integer tensor divided by one becomes float

    inc, ctx = _incremental(ToFloat(), torch.randn(1, 3, 16, 16))
    assert len(nodes_by_target(inc, aten.div.Tensor)) == 1
    assert len(nodes_by_target(drop_identity_ops(inc, ctx), aten.div.Tensor)) == 1


def test_engine_still_matches_the_dense_model():
    model = Scaled().eval()
    x = torch.randn(1, 3, 16, 16)
    engine = sigec.compile(model, (x,), policy="exact", block_size=4)
    engine(x)
    for region in ((slice(0, 3), slice(0, 3)), (slice(7, 12), slice(2, 9))):
        x2 = x.clone()
        x2[(..., *region)] = 2.0
        torch.testing.assert_close(engine(x2), model(x2), rtol=1e-5, atol=1e-6)
