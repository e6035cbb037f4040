import pytest
import torch
import torch.nn as nn

import sigec
from sigec.core.codegen import emit_incremental
from sigec.passes import fuse_scatter_gather
from sigec.passes.verifier import verify_incremental
from tests.passes.helpers import analyse, nodes_by_target

ops = torch.ops.sigec


def _chain():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)).eval()


@pytest.mark.parametrize("cache_dtype", [None, torch.float16])
def test_scatter_then_gather_becomes_one_op(cache_dtype):
    scatter, fused_op = ops.scatter_.default, ops.scatter_gather_.default
    gm, ctx = analyse(_chain(), (torch.randn(1, 3, 16, 16),), block_size=4)
    inc, _ = emit_incremental(gm, ctx.batch, cache_dtype=cache_dtype)
    assert len(nodes_by_target(inc, scatter)) == 2
    fused = fuse_scatter_gather(inc, ctx)
    verify_incremental(fused)
    assert len(nodes_by_target(fused, fused_op)) == 1
    assert len(nodes_by_target(fused, scatter)) == 1  # the output's scatter stays
    again = fuse_scatter_gather(fused, ctx)  # idempotent: nothing left to fuse
    assert len(nodes_by_target(again, fused_op)) == 1


def test_fused_graph_computes_what_the_unfused_one_does():
    gm, ctx = analyse(_chain(), (torch.randn(1, 3, 16, 16),), block_size=4)
    inc, sig = emit_incremental(gm, ctx.batch)
    fused = fuse_scatter_gather(emit_incremental(gm, ctx.batch)[0], ctx)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    caches = [torch.randn(1, 4, 16, 16) for _ in sig.caches]
    indices = [torch.tensor([[0, 1], [2, 3]]) for _ in sig.blocks]
    masks = [torch.ones(1, 1, 16, 16, dtype=torch.bool) for _ in sig.pixel_masks]
    copies = [c.clone() for c in caches]
    expected = inc(x, *caches, *indices, *masks)
    got = fused(x, *copies, *indices, *masks)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(copies, caches)  # the same blocks were written in place


def test_engine_with_fused_ops_matches_dense_exact():
    model = _chain()
    x = torch.randn(1, 3, 16, 16)
    engine = sigec.compile(model, (x,), policy="exact", block_size=4, expected_active_fraction=0.02)
    assert nodes_by_target(engine.incremental, ops.scatter_gather_.default)
    engine(x)
    x2 = x.clone()
    x2[..., 3:6, 9:12] = 0
    torch.testing.assert_close(engine(x2), model(x2), rtol=1e-4, atol=1e-5)
