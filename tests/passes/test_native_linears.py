import pytest
import torch
import torch.nn as nn

import sigec
from sigec.passes.verifier import verify_incremental
from tests.passes.helpers import nodes_by_target

aten, ops = torch.ops.aten, torch.ops.sigec


class TokenMix(nn.Module):
    """A convolution, a linear over the pixels' channels as tokens, a convolution."""

    def __init__(self):
        super().__init__()
        self.conv, self.proj, self.out = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 12), nn.Conv2d(12, 3, 3, padding=1)

    def forward(self, x):
        h = self.conv(x)
        n, c, height, width = h.shape
        tokens = self.proj(h.permute(0, 2, 3, 1).reshape(n, height * width, c))
        return self.out(tokens.reshape(n, height, width, -1).permute(0, 3, 1, 2))


def _edited(x):
    x2 = x.clone()
    x2[..., 2:5, 9:12] += 1.0
    return x2


def test_cpu_float_linears_become_sigec_linear_and_compute_the_same():
    torch.manual_seed(0)
    model, x = TokenMix().eval(), torch.randn(1, 3, 16, 16)
    engine = sigec.compile(model, (x,), policy="exact", block_size=4)
    for plan in engine.plans:
        verify_incremental(plan.incremental)
        assert nodes_by_target(plan.incremental, ops.linear.default)
        assert not nodes_by_target(plan.incremental, aten.linear.default)
    engine(x)
    x2 = _edited(x)
    torch.testing.assert_close(engine(x2), model(x2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_keep_aten_linear(dtype):
    torch.manual_seed(0)
    model, x = TokenMix().eval().to(dtype), torch.randn(1, 3, 16, 16, dtype=dtype)
    engine = sigec.compile(model, (x,), policy="exact", block_size=4)
    assert nodes_by_target(engine.incremental, aten.linear.default)
    assert not nodes_by_target(engine.incremental, ops.linear.default)
