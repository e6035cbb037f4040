"""Block grid and input windows.

Writes ``GRID`` (output block size) on every image value and ``WINDOW`` (``WindowSpec``: block,
input window, stride, offset, padding, crop) on every image node with a rule. Local ops take
their window from ``LocalRule.window``; per-pixel ops read exactly their own block. A local op
whose rule cannot serve the chosen block size (say a block that is not a multiple of an
up-sampling factor) loses its rule and becomes a fallback with the reason. Automatic block sizes
are raised to the multiples the local ops at their resolution need, so that never happens to them.
"""
from __future__ import annotations

from torch.fx import GraphModule

from sigec.ir import meta_keys as K
from sigec.passes.op_table import OpKind, identity_window
from sigec.passes.pass_base import PassContext, sigec_pass
from sigec.ir.plan import SpatialKind


def _block_multiples(gm: GraphModule) -> dict:
    """Per resolution, what automatic block sizes must be multiples of (up-sampling factors)."""
    multiples: dict = {}
    for node in gm.graph.nodes:
        rule = node.meta.get(K.RULE)
        if node.meta[K.SPATIAL].kind is SpatialKind.IMAGE and rule is not None and rule.kind is OpKind.LOCAL:
            res = node.meta[K.SPATIAL].resolution
            least = multiples.get(res, (1, 1))
            multiples[res] = tuple(max(a, b) for a, b in zip(least, rule.local.block_multiple(node)))
    return multiples


@sigec_pass(requires=(K.SPATIAL, K.RULE), provides=(K.GRID, K.WINDOW))
def analyze_halo(gm: GraphModule, ctx: PassContext) -> GraphModule:
    multiples = _block_multiples(gm)
    for node in gm.graph.nodes:
        info = node.meta[K.SPATIAL]
        node.meta[K.GRID] = None
        node.meta[K.WINDOW] = None
        if info.kind is not SpatialKind.IMAGE:
            continue
        block = ctx.settings.block_for(*info.resolution, multiple=multiples.get(info.resolution, (1, 1)))
        node.meta[K.GRID] = block
        rule = node.meta.get(K.RULE)
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
