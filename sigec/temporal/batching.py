"""Batched partial steps: the partial steps between two key steps evaluated as one ``vmap`` over the
timestep, with attention batched by hand (aten's ``scaled_dot_product_attention`` has no batching rule)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.fx import GraphModule

aten = torch.ops.aten


@torch.library.custom_op("sigec_temporal::sdpa", mutates_args=())
def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor],
          dropout_p: float, is_causal: bool, scale: Optional[float]) -> torch.Tensor:
    """``scaled_dot_product_attention`` as an op with a batching rule (aten's has none under vmap)."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)


@_sdpa.register_fake
def _(query, key, value, attn_mask, dropout_p, is_causal, scale):
    return query.new_empty(*query.shape[:-1], value.shape[-1])


def _fold(x: Optional[torch.Tensor], dim: Optional[int], size: int) -> Optional[torch.Tensor]:
    if x is None:
        return None
    x = x.unsqueeze(0).expand(size, *x.shape) if dim is None else x.movedim(dim, 0)
    return x.reshape(size * x.shape[1], *x.shape[2:])


@_sdpa.register_vmap
def _(info, in_dims, query, key, value, attn_mask, dropout_p, is_causal, scale):
    n = info.batch_size
    q, k, v, m = (_fold(t, d, n) for t, d in zip((query, key, value, attn_mask), in_dims[:4]))
    out = _sdpa(q, k, v, m, dropout_p, is_causal, scale)
    return out.reshape(n, -1, *out.shape[1:]), 0


def batchable(gm: GraphModule) -> GraphModule:
    """A copy of ``gm`` whose attention calls go through ``sigec_temporal::sdpa``."""
    g = torch.fx.Graph()
    env: dict = {}
    out = g.graph_copy(gm.graph, env)
    g.output(out)
    for n in g.nodes:
        if n.op == "call_function" and n.target == aten.scaled_dot_product_attention.default:
            args = list(n.args) + [None, 0.0, False][len(n.args) - 3:]
            n.target = torch.ops.sigec_temporal.sdpa.default
            n.args = (*args[:6], n.kwargs.get("scale"))
            n.kwargs = {}
    return GraphModule(gm, g, class_name="SigecPartialBatched")
