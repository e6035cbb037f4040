"""Cut specialization: the *full* and the *partial* graph of a cut, from one analysis.

A cut is a set of values of the captured graph that later calls reuse instead of computing
(temporal reuse: DeepCache's deep up-path feature, FasterDiffusion's encoder features). One
backward walk from the outputs, which stops at cut values, finds everything a *partial* call
still computes. From that one analysis two GraphModules are emitted:

* **full** ``(*inputs) -> (*outputs, *cut values)``: the model, also returning the cut values
  the partial graph reads;
* **partial** ``(*inputs, *cut values) -> (*outputs)``: the backward slice from the outputs that
  stops at the cut, with everything upstream of the cut removed. It keeps every input of the
  model in its signature (one calling convention), and ``CutSpecialization.reads`` states which
  of them it really reads. When it does not read a value that changes from call to call (the
  latent of a denoising loop), consecutive partial calls are independent and can run as one batch.

Writes ``CUT_ROLE`` on every node of the analysed graph: ``"cut"`` (a cut value the partial
graph reads), ``"partial"`` (computed by both graphs) or ``"full"`` (computed only by the full
graph: what a partial call saves). The analysed graph itself is not changed.

Invariants (checked by ``check_specialization``): the full graph's first outputs are the model's
outputs; the partial graph computes a subset of the full graph's nodes, reaches no ``"full"``
node, and both graphs lint.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
from torch.fx import Graph, GraphModule, Node

from sigec.ir import meta_keys as K
from sigec.passes.pass_base import PassContext, UserInputError, sigec_pass

CUT, PARTIAL, FULL = "cut", "partial", "full"


class CutError(UserInputError):
    """The cut does not name usable values of the graph."""


@dataclasses.dataclass(frozen=True)
class CutSpecialization:
    """What ``specialize_cut`` emits.

    Attributes:
        full: ``(*inputs) -> (*outputs, *cut values)``.
        partial: ``(*inputs, *cut values) -> (*outputs)``.
        cut: names of the cut values the partial graph reads, in the order both graphs use.
        unreached: names of requested cut values no output depends on through the partial
            slice (already cut off by other cut values, or dead); they are left out.
        inputs: names of the model's inputs, in order.
        reads: the inputs the partial graph reads (dependence analysis).
        num_outputs: the model's flat outputs, first in the full graph's results.
    """

    full: GraphModule
    partial: GraphModule
    cut: tuple[str, ...]
    unreached: tuple[str, ...]
    inputs: tuple[str, ...]
    reads: tuple[str, ...]
    num_outputs: int

    def reads_input(self, name: str) -> bool:
        return name in self.reads


@dataclasses.dataclass
class CutContext(PassContext):
    """``PassContext`` plus the cut to specialize (input) and the result (output).

    Attributes:
        cut: names of the nodes whose values a partial call reuses.
        specialization: written by ``specialize_cut``.
    """

    cut: tuple[str, ...] = ()
    specialization: Optional[CutSpecialization] = None


def _resolve_cut(gm: GraphModule, names: Sequence[str]) -> list[Node]:
    by_name = {n.name: n for n in gm.graph.nodes}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise CutError(f"cut names {unknown} that are not nodes of the graph")
    if not names:
        raise CutError("the cut is empty: name at least one value to reuse")
    nodes = [by_name[n] for n in dict.fromkeys(names)]
    for n in nodes:
        if n.op != "call_function":
            raise CutError(f"cut value {n.name!r} is a {n.op} node; a cut value must be computed by the graph "
                           "(an input or a weight is read by the partial graph anyway)")
        if not isinstance(n.meta.get("val"), torch.Tensor):
            raise CutError(f"cut value {n.name!r} ({n.target}) is not a tensor (meta['val'] is "
                           f"{type(n.meta.get('val')).__name__}); cut at a tensor it produces")
    return nodes


def partial_slice(gm: GraphModule, cut: Sequence[Node]) -> tuple[set[Node], list[Node]]:
    """``(nodes the partial graph computes, cut values it reads)``: the backward slice from the
    output node that stops at cut values (placeholders and weights it reaches are included)."""
    cut_set = set(cut)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    reached: set[Node] = set()
    read_cut: set[Node] = set()
    stack = list(output.all_input_nodes)
    while stack:
        n = stack.pop()
        if n in cut_set:
            read_cut.add(n)
            continue
        if n in reached:
            continue
        reached.add(n)
        stack.extend(n.all_input_nodes)
    return reached, [n for n in cut if n in read_cut]


def _emit_full(gm: GraphModule, cut: list[Node]) -> GraphModule:
    g = Graph()
    val_map: dict = {}
    outs = g.graph_copy(gm.graph, val_map)
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    g.output(tuple(outs + [val_map[c] for c in cut]))
    g.lint()
    return GraphModule(gm, g, class_name="SigecFull")


def _emit_partial(gm: GraphModule, keep: set[Node], cut: list[Node]) -> GraphModule:
    g = Graph()
    env: dict[Node, Node] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = g.node_copy(n, env.__getitem__)
    for c in cut:
        p = g.placeholder(f"cut_{c.name}")
        p.meta = {k: v for k, v in c.meta.items() if k in ("val", "tensor_meta", "nn_module_stack")}
        env[c] = p
    for n in gm.graph.nodes:
        if n in keep and n.op not in ("placeholder", "output"):
            env[n] = g.node_copy(n, env.__getitem__)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    g.output(torch.fx.node.map_arg(output.args[0], env.__getitem__))
    g.lint()
    return GraphModule(gm, g, class_name="SigecPartial")


def _num_outputs(gm: GraphModule) -> int:
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return len(out) if isinstance(out, (list, tuple)) else 1


@sigec_pass(provides=(K.CUT_ROLE,))
def specialize_cut(gm: GraphModule, ctx: CutContext) -> GraphModule:
    """Annotate ``CUT_ROLE`` and emit the full and partial graphs into ``ctx.specialization``."""
    if not isinstance(ctx, CutContext):
        raise TypeError(f"specialize_cut needs a CutContext (with the cut), got {type(ctx).__name__}")
    requested = _resolve_cut(gm, ctx.cut)
    keep, cut = partial_slice(gm, requested)
    if not cut:
        raise CutError(f"no output depends on the cut values {[c.name for c in requested]}: the partial graph "
                       "would be the whole model; cut at values on a path from the inputs to the outputs")
    cut_set = set(cut)
    for n in gm.graph.nodes:
        n.meta[K.CUT_ROLE] = CUT if n in cut_set else PARTIAL if n in keep else FULL
    inputs = tuple(n.name for n in gm.graph.nodes if n.op == "placeholder")
    ctx.specialization = CutSpecialization(
        full=_emit_full(gm, cut), partial=_emit_partial(gm, keep, cut), cut=tuple(c.name for c in cut),
        unreached=tuple(c.name for c in requested if c not in cut_set), inputs=inputs,
        reads=tuple(n for n in inputs if any(p.name == n for p in keep)), num_outputs=_num_outputs(gm))
    return gm


def check_specialization(gm: GraphModule, spec: CutSpecialization) -> None:
    """The invariants in the module docstring; raises ``AssertionError`` naming what broke."""
    for g in (spec.full, spec.partial):
        g.graph.lint()
    full_out = next(n for n in spec.full.graph.nodes if n.op == "output").args[0]
    if len(full_out) != spec.num_outputs + len(spec.cut):
        raise AssertionError(f"full graph returns {len(full_out)} values, expected "
                             f"{spec.num_outputs} outputs + {len(spec.cut)} cut values")
    roles = {n.name: n.meta.get(K.CUT_ROLE) for n in gm.graph.nodes}
    for n in spec.partial.graph.nodes:
        if n.op in ("output", "placeholder"):
            continue  # every input stays in the signature, read or not
        role = roles.get(n.name)
        if role != PARTIAL:
            raise AssertionError(f"partial graph node {n.name} has role {role!r} in the analysed graph")
    placeholders = [n.name for n in spec.partial.graph.nodes if n.op == "placeholder"]
    if placeholders != list(spec.inputs) + [f"cut_{c}" for c in spec.cut]:
        raise AssertionError(f"partial graph inputs {placeholders} are not the inputs then the cut values")
