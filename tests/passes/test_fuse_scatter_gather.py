import torch
import torch.nn as nn

import sigec
from sigec.codegen import emit_incremental
from sigec.passes import fuse_scatter_gather
from sigec.passes.verifier import verify_incremental
from tests.passes.helpers import analyse, nodes_by_target

ops = torch.ops.sigec


def _chain():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)).eval()


def test_scatter_then_gather_becomes_one_op_and_numerics_hold():
    gm, ctx = analyse(_chain(), (torch.randn(1, 3, 16, 16),), block_size=4)
    inc, _ = emit_incremental(gm, ctx.batch)
    assert len(nodes_by_target(inc, ops.scatter.default)) == 2
    fused = fuse_scatter_gather(inc, ctx)
    verify_incremental(fused)
    assert len(nodes_by_target(fused, ops.scatter_gather.default)) == 1
    assert len(nodes_by_target(fused, ops.scatter.default)) == 1  # the output's scatter stays
    again = fuse_scatter_gather(fused, ctx)  # idempotent: nothing left to fuse
    assert len(nodes_by_target(again, ops.scatter_gather.default)) == 1


def test_engine_with_fused_ops_matches_dense_exact():
    model = _chain()
    x = torch.randn(1, 3, 16, 16)
    engine = sigec.compile(model, (x,), policy="exact", block_size=4, expected_active_fraction=0.02)
    assert nodes_by_target(engine.incremental, ops.scatter_gather.default)
    engine(x)
    x2 = x.clone()
    x2[..., 3:6, 9:12] = 0
    torch.testing.assert_close(engine(x2), model(x2), rtol=1e-4, atol=1e-5)
