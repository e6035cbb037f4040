"""``aten.linear`` => ``sigec.linear`` on CPU float32 weights (incremental graph).

A transformer block's linears on the tokens of the active blocks multiply tens of rows by weights
of up to 52 MB (SD 1.x's 1280 -> 10240 feed-forward). The library GEMM packs the weight on every
call and ran them at 2-4 GB/s of weight; ``sigec.linear``'s native kernel reads the weight once,
in the layout it is stored in, when the product has few rows, and is ``F.linear`` otherwise.
Same values up to the summation order of a float product.

Only where that kernel exists: float32 weights on the CPU. Elsewhere (GPU, other dtypes) the
linears stay ATen ops, visible to the compilers that fuse them.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from sigec.passes.pass_base import PassContext, finish_rewrite, sigec_pass
from sigec.runtime import ops as _ops  # noqa: F401  (registers torch.ops.sigec.linear)

aten = torch.ops.aten


def _cpu_float_weight(node: Node) -> bool:
    weight = node.args[1] if len(node.args) > 1 else None
    val = weight.meta.get("val") if isinstance(weight, Node) else None
    return isinstance(val, torch.Tensor) and val.device.type == "cpu" and val.dtype == torch.float32


@sigec_pass()
def native_linears(gm: GraphModule, ctx: PassContext) -> GraphModule:
    del ctx
    rewritten = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == aten.linear.default and _cpu_float_weight(node):
            x, weight, *rest = node.args
            node.target = torch.ops.sigec.linear.default
            node.args = (x, weight, rest[0] if rest else node.kwargs.get("bias"))
            node.kwargs = {}
            rewritten += 1
    return finish_rewrite(gm, rewritten, "linear(s) as sigec.linear")
