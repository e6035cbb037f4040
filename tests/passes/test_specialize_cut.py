"""The cut specialization pass: slices, dependence analysis, errors, and numerics on random nets."""
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sigec.ir import meta_keys as K
from sigec.core.capture import capture
from sigec.ir.macs import node_macs
from sigec.passes import PassContext, TEMPORAL_PASSES, run_passes
from sigec.passes.specialize_cut import (CUT, FULL, PARTIAL, CutContext, CutError, check_specialization,
                                         specialize_cut)
from sigec.ir.settings import CompileSettings
from tests.random_nets import random_nets

aten = torch.ops.aten


class Ladder(nn.Module):
    """x -> a -> b -> c -> out, with a skip from a to the output and a timestep-like scale."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 4, 1)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x, scale):
        a = self.a(x)
        c = self.c(torch.relu(self.b(a))) * scale
        return self.out(torch.cat([c, a], dim=1))


def _captured(model=None, args=None):
    model = model or Ladder().eval()
    args = args or (torch.randn(1, 3, 8, 8), torch.tensor(2.0))
    return capture(model, args), model, args


def _node(gm, target, index=0):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target][index]


def _specialize(gm, cut):
    ctx = CutContext(CompileSettings(), cut=tuple(cut))
    gm = run_passes(gm, ctx, [specialize_cut])
    check_specialization(gm, ctx.specialization)
    return gm, ctx.specialization


def _calls(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_partial_graph_is_the_slice_below_the_cut():
    cap, model, (x, scale) = _captured()
    relu = _node(cap.gm, aten.relu.default)
    gm, spec = _specialize(cap.gm, [relu.name])
    # the partial graph recomputes conv a (the skip), conv c and the head; conv b is cut off
    assert _calls(spec.partial).count(aten.conv2d.default) == 3
    assert aten.relu.default not in _calls(spec.partial)
    assert spec.cut == (relu.name,) and spec.unreached == ()
    assert spec.reads == ("x", "scale") and spec.num_outputs == 1
    roles = {n.name: n.meta[K.CUT_ROLE] for n in gm.graph.nodes}
    assert roles[relu.name] == CUT
    assert roles[_node(gm, aten.conv2d.default, 1).name] == FULL  # conv b
    assert roles[_node(gm, aten.conv2d.default, 0).name] == PARTIAL  # conv a feeds the skip
    with torch.no_grad():
        out, cut_value = spec.full(x, scale)
        assert torch.equal(out, model(x, scale))
        assert torch.equal(spec.partial(x, scale, cut_value)[0], out)
        # the partial graph really reads its cut input
        assert not torch.equal(spec.partial(x, scale, cut_value + 1)[0], out)


def test_dependence_analysis_says_the_latent_is_not_read():
    cap, _, (x, scale) = _captured()
    a = _node(cap.gm, aten.conv2d.default, 0)
    mul = _node(cap.gm, aten.mul.Tensor)
    relu = _node(cap.gm, aten.relu.default)
    _, spec = _specialize(cap.gm, [a.name, relu.name])
    assert spec.reads == ("scale",) and not spec.reads_input("x")
    with torch.no_grad():
        out, *cut = spec.full(x, scale)
        # independent of x: any latent gives the same output, a different scale does not
        assert torch.equal(spec.partial(torch.randn_like(x), scale, *cut)[0], out)
        assert not torch.equal(spec.partial(x, scale * 2, *cut)[0], out)
    _, spec = _specialize(cap.gm, [a.name, mul.name])
    assert spec.reads == ()


def test_cut_values_behind_other_cut_values_are_dropped():
    cap, _, _ = _captured()
    b = _node(cap.gm, aten.conv2d.default, 1)
    relu = _node(cap.gm, aten.relu.default)
    _, spec = _specialize(cap.gm, [b.name, relu.name])
    assert spec.cut == (relu.name,) and spec.unreached == (b.name,)
    placeholders = [n.name for n in spec.partial.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["x", "scale", f"cut_{relu.name}"]


def test_the_analysed_graph_is_unchanged_and_the_pass_is_repeatable():
    cap, _, _ = _captured()
    before = cap.gm.code
    relu = _node(cap.gm, aten.relu.default)
    gm, first = _specialize(cap.gm, [relu.name])
    assert gm is cap.gm and gm.code == before
    _, second = _specialize(gm, [relu.name])
    assert first.partial.code == second.partial.code and first.full.code == second.full.code


def test_macs_split_between_the_graphs():
    cap, _, _ = _captured()
    relu = _node(cap.gm, aten.relu.default)
    gm, spec = _specialize(cap.gm, [relu.name])
    full_only = sum(node_macs(n) for n in gm.graph.nodes if n.meta[K.CUT_ROLE] == FULL)
    partial = sum(node_macs(n) for n in spec.partial.graph.nodes)
    assert partial + full_only == sum(node_macs(n) for n in spec.full.graph.nodes)
    assert full_only == 4 * 4 * 9 * 64  # conv b: 4 in, 4 out, 3x3, 8x8


@pytest.mark.parametrize("make_cut, message", [
    (lambda gm: ["nope"], "not nodes of the graph"),
    (lambda gm: [], "empty"),
    (lambda gm: ["x"], "placeholder"),
    (lambda gm: [next(n.name for n in gm.graph.nodes if n.op == "get_attr")], "get_attr"),
])
def test_bad_cuts_are_named(make_cut, message):
    cap, _, _ = _captured()
    with pytest.raises(CutError, match=message):
        _specialize(cap.gm, make_cut(cap.gm))


def test_a_cut_no_output_depends_on_is_refused():
    cap, _, _ = _captured()
    x = next(n for n in cap.gm.graph.nodes if n.op == "placeholder")
    with cap.gm.graph.inserting_after(x):
        dead = cap.gm.graph.call_function(aten.sin.default, (x,))  # computed, but no output reads it
    dead.meta["val"] = x.meta["val"]
    with pytest.raises(CutError, match="no output depends"):
        _specialize(cap.gm, [dead.name])


def test_needs_a_cut_context():
    cap, _, _ = _captured()
    with pytest.raises(Exception, match="CutContext"):
        specialize_cut(cap.gm, PassContext(CompileSettings()))
    assert [p.sigec_pass.name for p in TEMPORAL_PASSES] == ["specialize_cut"]


def test_check_specialization_catches_a_wrong_partial_graph():
    cap, _, _ = _captured()
    relu = _node(cap.gm, aten.relu.default)
    gm, spec = _specialize(cap.gm, [relu.name])
    b = _node(gm, aten.conv2d.default, 1)
    b.meta[K.CUT_ROLE] = FULL
    conv_c = _node(gm, aten.conv2d.default, 2)
    conv_c.meta[K.CUT_ROLE] = FULL  # as if the partial graph computed something it should skip
    with pytest.raises(AssertionError, match="role 'full'"):
        check_specialization(gm, spec)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(net=random_nets(), data=st.data())
def test_random_cuts_reproduce_the_model(net, data):
    """For any cut of a random conv net, the partial graph fed the full graph's cut values gives the
    model's output bit for bit, and an input the partial graph does not read does not matter."""
    model, x = net
    cap = capture(model.eval(), (x,))
    values = [n.name for n in cap.gm.graph.nodes
              if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)]
    cut = data.draw(st.lists(st.sampled_from(values), min_size=1, max_size=3, unique=True))
    try:
        _, spec = _specialize(cap.gm, cut)
    except CutError as exc:
        assert "no output depends" in str(exc)
        return
    with torch.no_grad():
        expected = model(x)
        out, *cut_values = spec.full(x)
        assert torch.equal(out, expected)
        assert torch.equal(spec.partial(x, *cut_values)[0], expected)
        if not spec.reads_input("x"):
            assert torch.equal(spec.partial(torch.randn_like(x), *cut_values)[0], expected)
