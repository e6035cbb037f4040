"""Checks of the invariants in ``passes/README.md``, run between passes in tests.

``verify(gm, after)`` checks everything that must hold once the named pass has run and raises
``InvariantError`` naming the node and the broken rule.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from sigec.ir import meta_keys as K
from sigec.passes.op_table import OpKind
from sigec.ir.plan import DecisionKind, SpatialKind
from sigec.runtime.ops import dense_conv_input

_ORDER = ["classify_spatial", "propagate_masks", "analyze_halo", "partition", "fold_norm_activation"]


class InvariantError(AssertionError):
    pass


def _fail(node, msg: str):
    raise InvariantError(f"node {node.name} ({node.target}): {msg}")


def verify(gm: GraphModule, after: str) -> None:
    if after not in _ORDER:
        raise ValueError(f"{after!r} is not an analysis pass; passes: {_ORDER}")
    stage = _ORDER.index(after)
    for node in gm.graph.nodes:
        if node.op in ("call_function", "placeholder", "get_attr") and "val" not in node.meta:
            _fail(node, "meta['val'] is missing")
        info = node.meta.get(K.SPATIAL)
        if info is None:
            _fail(node, "has no spatial class")
        if info.kind is SpatialKind.IMAGE and info.resolution is None:
            _fail(node, "image without a resolution")
        if stage >= 1 and node.op != "output":
            rule = node.meta.get(K.RULE)
            ignored = rule is not None and rule.kind is OpKind.IGNORED
            if info.kind is SpatialKind.IMAGE and not ignored and node.meta.get(K.MASK) is None:
                _fail(node, "image without a mask")
            if not info.tainted and node.meta.get(K.MASK) is not None:
                _fail(node, "static value with a mask")
            if node.meta.get(K.MASK) is not None and info.kind is SpatialKind.IMAGE \
                    and node.meta[K.MASK].res != info.resolution:
                _fail(node, f"mask resolution {node.meta[K.MASK].res} != value resolution {info.resolution}")
        if stage >= 2 and info.kind is SpatialKind.IMAGE and node.meta.get(K.GRID) is None:
            _fail(node, "image without a block grid")
        if stage >= 3:
            decision = node.meta.get(K.DECISION)
            if decision is None:
                _fail(node, "no decision")
            if decision.kind is DecisionKind.SPARSE:
                if info.kind is not SpatialKind.IMAGE or node.meta.get(K.RULE) is None:
                    _fail(node, "sparse decision on a node without a rule or not image-like")
                if node.meta.get(K.WINDOW) is None:
                    _fail(node, "sparse node without a window")
            if not info.tainted and decision.kind not in (DecisionKind.STATIC,):
                _fail(node, f"static value decided {decision.kind.value}")
        if stage >= 4:
            pro = node.meta.get(K.PROLOGUE)
            if pro is not None and node.meta[K.DECISION].kind is not DecisionKind.SPARSE:
                _fail(node, "gather prologue on a node that is not sparse")


def verify_incremental(gm: GraphModule) -> None:
    """The incremental graph calls only ATen, ``sigec::`` ops, getitem and the layout helper
    ``dense_conv_input`` (it returns its input or a contiguous copy, which no custom op may
    do), and lints."""
    gm.graph.lint()
    for node in gm.graph.nodes:
        if node.op == "call_function":
            t = node.target
            ok = (isinstance(t, torch._ops.OpOverload) and t.namespace in ("aten", "sigec")) or t is dense_conv_input
            if not ok and getattr(t, "__name__", "") != "getitem":
                _fail(node, "incremental graph calls something other than aten, sigec ops and getitem")
        elif node.op not in ("placeholder", "get_attr", "output"):
            _fail(node, f"unexpected {node.op} node in the incremental graph")
