"""Kernel launches read from the incremental graph (sigec.core.launches)."""
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Graph, GraphModule

import sigec
from sigec.core.codegen import emit_incremental
from sigec.core.launches import KINDS, count_launches, launching_ops, op_kind

aten = torch.ops.aten


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        return self.c2(F.relu(self.c1(x))) + x


class NormSkip(nn.Module):
    """Group norm + SiLU folded into a gather, a residual, a skip concatenation, an upsampling."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(32, 3, 3, padding=1)

    def forward(self, x):
        h = self.c1(x)
        y = self.c2(F.silu(self.norm(h))) + h
        y = F.interpolate(self.down(y), scale_factor=2.0, mode="nearest")
        return self.c3(torch.cat([y, h], dim=1))


def _engine(model, size=32, fractions=(0.05,)):
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    engine = sigec.compile(model.eval(), (x,), block_size=4, expected_active_fraction=fractions)
    engine(x)
    return engine, x


def _call_inputs(engine, plan, x_edit):
    """The arguments the engine passes to ``plan``'s incremental graph for ``x_edit``."""
    calls = []
    graph = plan.incremental
    plan.incremental = lambda *args: calls.append(args) or graph(*args)
    try:
        engine(x_edit)
    finally:
        plan.incremental = graph
    assert calls, "the edit ran another plan"
    return calls[0]


def _edit(x, top=10, left=12, size=6):
    y = x.clone()
    y[..., top:top + size, left:left + size] += 1.0
    return y


def test_two_convolutions_launch_seven_kernels():
    engine, _ = _engine(TwoConvs())
    count = count_launches(engine.plans[0])
    # gather(x) -> conv -> scatter_ into the cache; gather with ReLU folded in -> conv -> residual
    # add (reads x's blocks) -> scatter_ into the output cache: one kernel each
    assert (count.launches, count.ops, count.nodes) == (7, 7, 7)
    assert count.by_kind == {"gather": 3, "scatter": 2, "conv": 2}
    assert set(count.by_kind) <= set(KINDS)


def _graph(build) -> GraphModule:
    g = Graph()
    x = g.placeholder("x")
    g.output(build(g, x))
    return GraphModule(torch.nn.Module(), g)


def test_views_and_no_op_conversions_launch_nothing():
    def build(g, x):
        p = g.call_function(aten.permute.default, (x, [0, 2, 3, 1]))
        view = g.call_function(aten.reshape.default, (x, [1, -1]))          # contiguous: a view
        copy = g.call_function(aten.reshape.default, (p, [1, -1]))          # permuted: must copy
        same = g.call_function(aten.to.dtype, (x, torch.float32))            # returns x itself
        wide = g.call_function(aten.to.dtype, (x, torch.float64))            # converts
        g.call_function(aten._assert_tensor_metadata.default, (x,), {"dtype": torch.float32})
        empty = g.call_function(aten.empty.memory_format, ([4],), {"device": torch.device("cpu")})
        ones = g.call_function(aten.ones.default, ([4],), {"device": torch.device("cpu")})
        s = g.call_function(aten.add.Tensor, (same, x))
        return (view, copy, wide, empty, ones, s)

    gm = _graph(build)
    x = torch.randn(1, 4, 5, 6)
    count = count_launches(types.SimpleNamespace(incremental=gm, planned_fraction=1.0), [x])
    assert set(count.by_node) == {"reshape_default_1", "to_dtype_1", "ones_default", "add_tensor"}
    assert count.launches == 4
    with torch.no_grad():
        assert sum(launching_ops(lambda: gm(x)).values()) == count.ops == 4


def test_sigec_ops_count_the_kernels_of_their_cuda_implementation():
    def build(g, x):
        idx, base = g.placeholder("idx"), g.placeholder("base")
        cat = g.call_function(torch.ops.sigec.gather_cat.default,
                              ([x, x], idx, [4, 4], [4, 4], [0, 0], "constant", 0.0, None, None, "none", 0.0))
        fused = g.call_function(torch.ops.sigec.scatter_gather_.default,
                                (base, cat, idx, [4, 4], idx, [4, 4], [4, 4], [0, 0], "constant", 0.0))
        return (fused,)

    gm = _graph(build)
    inputs = (torch.randn(1, 2, 8, 8), torch.tensor([[0, 0], [1, 1]]), torch.randn(1, 4, 8, 8))
    count = count_launches(types.SimpleNamespace(incremental=gm, planned_fraction=1.0), inputs)
    with torch.no_grad():
        assert sum(launching_ops(lambda: gm(*inputs)).values()) == count.ops == 2
    # gather_cat: one kernel per source; scatter_gather_: a scatter then a gather
    assert count.by_node == {"gather_cat_default": 2, "scatter_gather__default": 2}
    assert (count.launches, count.ops, count.nodes) == (4, 2, 2)
    assert count.by_kind == {"gather": 2, "scatter": 2}


@pytest.mark.parametrize("model", [TwoConvs, NormSkip])
def test_graph_count_equals_the_operators_dispatched_at_run_time(model):
    engine, x = _engine(model(), fractions=(0.05, 0.3))
    for x_edit in (_edit(x), _edit(x, 0, 0, 24)):
        engine(x_edit)
        plan = engine._plan
        inputs = _call_inputs(engine, plan, x_edit)
        with torch.no_grad():
            dispatched = launching_ops(lambda: plan.incremental(*inputs))
        count = count_launches(plan, inputs)
        assert sum(dispatched.values()) == count.ops
        assert count.launches >= count.ops >= count.nodes > 0
        # the recorded shapes (one block per grid) give the same count as a real call here
        assert count_launches(plan) == count


@pytest.mark.parametrize("model", [TwoConvs, NormSkip])
def test_fusion_passes_never_add_launches(model):
    engine, _ = _engine(model(), fractions=(0.05, 0.3))
    fewer_nodes = []
    for plan in engine.plans:
        unfused, signature = emit_incremental(plan.graph_module, plan.context.batch)
        before = count_launches(types.SimpleNamespace(incremental=unfused, signature=signature,
                                                      graph_module=plan.graph_module, planned_fraction=1.0))
        after = count_launches(plan)
        assert after.launches <= before.launches
        assert after.nodes <= before.nodes
        fewer_nodes.append(after.nodes < before.nodes)
    if model is NormSkip:
        # at 5% a scatter and the gather after it become one sigec.scatter_gather_ node; its CUDA
        # implementation still launches both kernels, so the launches stay equal
        assert fewer_nodes[0]


def test_report_lists_launches_per_plan():
    engine, x = _engine(NormSkip(), fractions=(0.05, 0.3))
    engine(_edit(x))
    report = engine.report()
    assert set(report.launches) == {0.05, 0.3}
    assert report.launches[0.05] == count_launches(engine.plans[0])
    text = str(report)
    assert "launches per call, plan 5.0% (this edit's plan)" in text
    assert f"{report.launches[0.3].launches} launches" in text


def test_report_stands_when_a_plan_cannot_be_counted(monkeypatch, caplog):
    from sigec.core import report as report_module

    engine, x = _engine(TwoConvs())
    engine(_edit(x))

    def refuse(plan):
        raise NotImplementedError("no meta kernel for sigec.example\nmore")

    monkeypatch.setattr(report_module, "count_launches", refuse)
    report = engine.report()
    assert report.launches == {0.05: "NotImplementedError: no meta kernel for sigec.example"}
    assert "not counted (NotImplementedError: no meta kernel" in str(report)
    assert "not counted" in caplog.text


def test_sigec_linear_is_a_matrix_product():
    assert op_kind(torch.ops.sigec.linear.default) == op_kind(torch.ops.aten.addmm.default) == "matmul"
