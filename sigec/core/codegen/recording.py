"""Emit the recording GraphModule: the dense model plus what the incremental graph reads.

Inputs are the flat user inputs; outputs are ``(*flat model outputs, *cached tensors)`` in the
order of the ``(node name, kind)`` cache keys it is given (the union of every plan's
``IncrementalSignature.caches``): recorded values, and for each frozen normalization its
``(scale, shift)`` from ``sigec.norm_affine``.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import Graph, GraphModule

from sigec.core.codegen.incremental import NORM_SCALE, VALUE
from sigec.passes.op_table import norm_args, num_groups


def emit_recording(gm: GraphModule, cache_keys: list) -> GraphModule:
    g = Graph()
    val_map: dict = {}
    outs = g.graph_copy(gm.graph, val_map)
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    by_name = {n.name: n for n in gm.graph.nodes}
    norm_cache: dict = {}
    cached = []
    for name, kind in cache_keys:
        node = by_name[name]
        if kind == VALUE:
            cached.append(val_map[node])
            continue
        if name not in norm_cache:
            x, w, b, eps = norm_args(node)
            pair = g.call_function(torch.ops.sigec.norm_affine.default,
                                   (val_map[x], num_groups(node), val_map.get(w), val_map.get(b), eps))
            norm_cache[name] = (g.call_function(operator.getitem, (pair, 0)),
                                g.call_function(operator.getitem, (pair, 1)))
        cached.append(norm_cache[name][0 if kind == NORM_SCALE else 1])
    g.output(tuple(outs + cached))
    g.lint()
    return GraphModule(gm, g, class_name="SigecRecording")
