"""The reference runtime: a pure-PyTorch interpreter of the same plan (the test oracle).

It runs the *dense* analysed graph node by node and, instead of gathering and scattering,
computes every op on whole tensors and selects with the plan's masks:

* sparse nodes:   ``where(pixels of the active blocks, new, recorded)``;
* dense nodes:    the dense value (normalizations with their frozen affine);
* fallbacks:      dense; values leaving a fallback region are taken inside their pixel mask;
* static nodes:   as in the model.

It shares no code with codegen or the sparse ops, so agreement between the two is evidence
that both implement the plan.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from sigec.ir import meta_keys as K
from sigec.ir.plan import needs_select
from sigec.passes.op_table import OpKind, norm_args, num_groups
from sigec.ir.plan import NHWC, DecisionKind, SpatialKind
from sigec.runtime import masks as M


def _norm_affine(x: torch.Tensor, groups: int, weight, bias, eps: float):
    n, c = x.shape[:2]
    xf = x.float().reshape(n, groups, -1)
    mean = xf.mean(dim=2)
    var = ((xf - mean[:, :, None]) ** 2).mean(dim=2)
    rstd = (var + eps).rsqrt().repeat_interleave(c // groups, 1)
    mean = mean.repeat_interleave(c // groups, 1)
    scale = rstd * (weight.float() if weight is not None else 1.0)
    shift = (bias.float() if bias is not None else 0.0) - mean * scale
    return scale, shift


class ReferenceRuntime:
    """Record with ``record(flat_inputs)``; then ``run(flat_inputs, input_mask)``; ``commit()``
    makes the last run the baseline (normalization statistics stay frozen, as in the engine).

    Values are kept by node name, so one recording serves every plan of an engine: pass the
    analysed graph of the plan an edit ran (``engine.graph_module`` after the call) to ``run``.
    """

    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.recorded: dict[str, Any] = {}
        self.norms: dict[str, tuple] = {}

    def _execute(self, gm: GraphModule, flat_inputs: list, on_node) -> list:
        env: dict[Node, Any] = {}
        inputs = iter(flat_inputs)
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                env[node] = next(inputs)
            elif node.op == "get_attr":
                env[node] = _fetch(gm, node.target)
            elif node.op == "call_function":
                args = map_arg(node.args, lambda n: env[n])
                kwargs = map_arg(node.kwargs, lambda n: env[n])
                env[node] = on_node(node, args, kwargs, env)
            elif node.op == "output":
                out = map_arg(node.args[0], lambda n: env[n])
                self._last_env = {n.name: v for n, v in env.items()}
                return list(out) if isinstance(out, (list, tuple)) else [out]
        raise RuntimeError("graph has no output")

    def record(self, flat_inputs: list) -> list:
        def dense(node, args, kwargs, env):
            value = node.target(*args, **kwargs)
            rule = node.meta.get(K.RULE)
            if rule is not None and rule.kind is OpKind.NORM:
                x, w, b, eps = norm_args(node)
                self.norms[node.name] = _norm_affine(env[x], num_groups(node), env.get(w), env.get(b), eps)
            return value

        with torch.no_grad():
            outs = self._execute(self.gm, flat_inputs, dense)
        self.recorded = dict(self._last_env)
        return outs

    def run(self, flat_inputs: list, input_mask: torch.Tensor, gm: Optional[GraphModule] = None) -> list:
        """The plan of ``gm`` (default: the one given at construction) on an edit."""
        gm = self.gm if gm is None else gm
        exprs = [n.meta[K.MASK] for n in gm.graph.nodes if n.meta.get(K.MASK) is not None]
        masks = M.evaluate_masks(exprs, input_mask)

        def step(node, args, kwargs, env):
            decision = node.meta[K.DECISION].kind
            rule = node.meta.get(K.RULE)
            if rule is not None and rule.kind is OpKind.NORM and decision is not DecisionKind.FALLBACK:
                scale, shift = self.norms[node.name]
                x = args[0]
                value = (x * scale[:, :, None, None] + shift[:, :, None, None]).to(x.dtype)
            else:
                value = node.target(*args, **kwargs)
            if decision is DecisionKind.SPARSE and node.meta[K.SPATIAL].kind is SpatialKind.IMAGE \
                    and isinstance(value, torch.Tensor):
                mask, block = node.meta[K.MASK], node.meta[K.GRID]
                res = node.meta[K.SPATIAL].resolution
                pixels = M.blocks_to_pixels(M.active_blocks(masks[mask], block), block, res)
                value = torch.where(_broadcastable(pixels, node), value, self.recorded[node.name])
            elif needs_select(node):
                value = torch.where(_broadcastable(masks[node.meta[K.MASK]], node), value, self.recorded[node.name])
            return value

        with torch.no_grad():
            return self._execute(gm, flat_inputs, step)

    def commit(self) -> None:
        """The values of the last ``run`` become the recorded ones."""
        self.recorded = dict(self._last_env)


def _broadcastable(pixels: torch.Tensor, node: Node) -> torch.Tensor:
    """An H x W map shaped to broadcast over the node's layout."""
    return pixels[None, :, :, None] if node.meta[K.SPATIAL].layout == NHWC else pixels[None, None]


def _fetch(gm: GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
