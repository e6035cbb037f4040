import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import sigec
from sigec.core.codegen import emit_incremental
from sigec.passes import strided_nearest_downsample
from sigec.passes.verifier import verify_incremental
from tests.passes.helpers import analyse, nodes_by_target

aten = torch.ops.aten


class LabelPyramid(nn.Module):
    """SPADE's shape: the label map resized to each layer's resolution and convolved there."""

    def __init__(self, sizes, mode_kwargs=None):
        super().__init__()
        self.sizes = sizes
        self.kwargs = mode_kwargs or {}
        self.convs = nn.ModuleList(nn.Conv2d(3, 4, 3, padding=1) for _ in sizes)

    def forward(self, seg):
        resized = [F.interpolate(seg, **({"size": s} if s is not None else self.kwargs)) for s in self.sizes]
        return sum(F.interpolate(conv(r), size=(32, 32)) for conv, r in zip(self.convs, resized))


def _incremental(model, x):
    gm, ctx = analyse(model.eval(), (x,), policy="exact", block_size=4)
    inc, _ = emit_incremental(gm, ctx.batch)
    ctx.dense_graph = gm
    return inc, ctx


def _full_size_resizes(gm):
    return [n for n in nodes_by_target(gm, aten.upsample_nearest2d.vec)
            if n.args[0].op == "placeholder"]


def test_whole_factor_downsamplings_of_full_tensors_become_strided_copies():
    model, x = LabelPyramid([(4, 4), (8, 8), (16, 16)]), torch.randn(1, 3, 32, 32)
    inc, ctx = _incremental(model, x)
    assert len(_full_size_resizes(inc)) == 3
    out = strided_nearest_downsample(inc, ctx)
    verify_incremental(out)
    assert _full_size_resizes(out) == []
    assert len(nodes_by_target(out, aten.clone.default)) >= 3


def test_other_resizes_are_kept():
    # 32 -> 12 is not a whole factor, scale factors map differently, and up-sampling is no slice
    for model in (LabelPyramid([(12, 12)]), LabelPyramid([None], {"scale_factor": 0.5}),
                  LabelPyramid([(64, 64)])):
        inc, ctx = _incremental(model, torch.randn(1, 3, 32, 32))
        before = len(nodes_by_target(inc, aten.upsample_nearest2d.vec))
        assert len(nodes_by_target(strided_nearest_downsample(inc, ctx), aten.upsample_nearest2d.vec)) == before


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.integers(1, 3))
def test_strided_slice_equals_nearest_resize_bit_for_bit(fh, fw, h, w, channels):
    x = torch.randn(2, channels, fh * h, fw * w)
    expected = F.interpolate(x, size=(h, w), mode="nearest")
    assert torch.equal(x[:, :, ::fh, ::fw].contiguous(), expected)


@pytest.mark.parametrize("policy", ["exact", "sige"])
def test_engine_with_the_rewrite_equals_the_engine_without_it_and_exact_equals_dense(policy, monkeypatch):
    import sigec.spatial.build as build

    torch.manual_seed(0)
    model, x = LabelPyramid([(4, 4), (8, 8), (16, 16)]).eval(), torch.randn(1, 3, 32, 32)
    edited = x.clone()
    edited[..., 3:9, 20:27] += 1.0
    outputs = []
    for passes in (build.INCREMENTAL_PASSES, [p for p in build.INCREMENTAL_PASSES if p is not strided_nearest_downsample]):
        monkeypatch.setattr(build, "INCREMENTAL_PASSES", passes)
        engine = sigec.compile(model, (x,), policy=policy, block_size=4)
        rewritten = not any(n.target == aten.upsample_nearest2d.vec and n.args[0].op == "placeholder"
                            for p in engine.plans for n in p.incremental.graph.nodes)
        assert rewritten == (strided_nearest_downsample in passes)
        engine(x)
        outputs.append(engine(edited))
    assert torch.equal(outputs[0], outputs[1])
    if policy == "exact":
        torch.testing.assert_close(outputs[0], model(edited), rtol=1e-5, atol=1e-5)
