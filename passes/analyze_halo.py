"""Block grid and input windows.

Writes ``GRID`` (output block size) on every image value and ``WINDOW`` (``WindowSpec``: block,
input window, stride, offset, padding, crop) on every image node with a rule. Local ops take
their window from ``LocalRule.window``; per-pixel ops read exactly their own block. An op whose
rule needs blocks of a multiple (an up-sampling's output blocks must cover whole input pixels)
gets its own block raised to it, while the ops around it keep the resolution's finer blocks. A
local op whose rule still cannot serve its block loses its rule and becomes a fallback with the
reason.
"""
from __future__ import annotations

from torch.fx import GraphModule

from sigec.ir import meta_keys as K
from sigec.passes.op_table import OpKind, identity_window
from sigec.passes.pass_base import PassContext, sigec_pass
from sigec.ir.plan import SpatialKind


def _raised(block: tuple[int, int], multiple: tuple[int, int], resolution: tuple[int, int]) -> tuple[int, int]:
    return tuple(min(-(-b // m) * m, r) for b, m, r in zip(block, multiple, resolution))


@sigec_pass(requires=(K.SPATIAL, K.RULE), provides=(K.GRID, K.WINDOW))
def analyze_halo(gm: GraphModule, ctx: PassContext) -> GraphModule:
    for node in gm.graph.nodes:
        info = node.meta[K.SPATIAL]
        node.meta[K.GRID] = None
        node.meta[K.WINDOW] = None
        if info.kind is not SpatialKind.IMAGE:
            continue
        block = ctx.settings.block_for(*info.resolution)
        rule = node.meta.get(K.RULE)
        if rule is not None and node.op == "call_function" and rule.kind is OpKind.LOCAL:
            # an up-sampling's output blocks must cover whole input pixels: its own blocks are
            # raised to the factor, finer ones stay for the ops around it
            block = _raised(block, rule.local.block_multiple(node), info.resolution)
        node.meta[K.GRID] = block
        if rule is None or node.op != "call_function":
            continue
        if rule.kind is OpKind.LOCAL:
            spec = rule.local.window(node, block)
            if isinstance(spec, str):
                node.meta[K.RULE] = None
                ctx.fallbacks[node.name] = spec
                ctx.approximations.setdefault(node.name, spec)
                continue
            node.meta[K.WINDOW] = spec
        elif rule.kind is not OpKind.IGNORED:
            node.meta[K.WINDOW] = identity_window(block)
    return gm
