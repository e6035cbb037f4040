"""Cuts: which values of the captured graph a partial step reuses, named by module (``ModuleCut``),
by DeepCache's branch (``DeepCacheCut``) or as FasterDiffusion's encoder (``EncoderCut``). Each
``resolve(gm)`` returns the cut nodes' names for ``passes/specialize_cut.py``."""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import re
from typing import Sequence

import torch
from torch.fx import GraphModule, Node

from sigec.passes.specialize_cut import CutError

aten = torch.ops.aten

_DYNAMO_ROOT = re.compile(r"^[A-Z]\['[^']*'\]")


def module_path(raw: str) -> str:
    """A module's dotted name from an ``nn_module_stack`` entry, export style (``up_blocks.3.resnets.1``)
    or dynamo style (``L['self'].__dict__['_modules']['up_blocks'].3...``)."""
    path = _DYNAMO_ROOT.sub("", raw)
    path = re.sub(r"\.__dict__\['_modules'\]\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]|\[(\d+)\]", lambda m: "." + (m.group(1) or m.group(2)), path)
    return path.strip(".")


def scope(node: Node) -> list[str]:
    """Module paths a node was computed in, outermost first (the root module left out)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [p for p in (module_path(v[0]) for v in stack.values()) if p]


def module_names(gm: GraphModule) -> list[str]:
    """Every module path that appears in the graph's ``nn_module_stack``, in first-use order."""
    return list(dict.fromkeys(p for n in gm.graph.nodes for p in scope(n)))


def module_outputs(gm: GraphModule, modules: Sequence[str]) -> dict[str, list[Node]]:
    """The tensors each module hands to the rest of the graph: nodes computed inside it with a
    user outside it (users kept only for their side effects, such as shape asserts, do not count)."""
    wanted = set(modules)
    scopes = {n: set(scope(n)) for n in gm.graph.nodes}
    outputs: dict[str, list[Node]] = {m: [] for m in modules}
    for n in gm.graph.nodes:
        if n.op != "call_function" or not isinstance(n.meta.get("val"), torch.Tensor):
            continue
        for m in scopes[n] & wanted:
            if any(u.op == "output" or (u.users and m not in scopes[u]) for u in n.users):
                outputs[m].append(n)
    return outputs


@dataclasses.dataclass(frozen=True)
class ModuleCut:
    """The outputs of named modules (``fnmatch`` patterns over ``nn_module_stack`` names)."""

    modules: tuple[str, ...]

    def resolve(self, gm: GraphModule) -> list[str]:
        names = module_names(gm)
        matched: list[str] = []
        for pattern in self.modules:
            hits = [m for m in names if fnmatch.fnmatchcase(m, pattern)]
            if not hits:
                close = difflib.get_close_matches(pattern, names, n=5)
                raise CutError(f"cut module {pattern!r} is not in the captured graph"
                               + (f"; close names: {close}" if close else f"; modules include {names[:8]}..."))
            matched += hits
        nodes = [n.name for ns in module_outputs(gm, list(dict.fromkeys(matched))).values() for n in ns]
        if not nodes:
            raise CutError(f"modules {list(self.modules)} have no tensor outputs in the captured graph")
        return list(dict.fromkeys(nodes))


def _unet_prefix(gm: GraphModule, what: str) -> tuple[str, list[str]]:
    """``(prefix, module names)`` of the diffusers UNet in the graph (the prefix is empty unless the
    UNet was called from inside another module)."""
    names = module_names(gm)
    prefixes = {m.group(1) for p in names if (m := re.fullmatch(r"(.*?)up_blocks\.\d+", p))}
    if not prefixes:
        raise CutError(f"{what} needs a diffusers UNet2DModel or UNet2DConditionModel (modules up_blocks.N, "
                       f"down_blocks.N, mid_block); the captured graph has modules {names[:6]}...")
    if len(prefixes) > 1:
        raise CutError(f"{what}: the graph holds several UNets ({sorted(prefixes)}); compile one UNet")
    return prefixes.pop(), names


def _indices(names: Sequence[str], pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for p in names if (m := re.fullmatch(pattern, p))})


@dataclasses.dataclass(frozen=True)
class DeepCacheCut:
    """The value DeepCache's ``cache_branch_id`` caches: block ``branch // 3``, layer ``branch % 3``
    counted from the shallow end of the up path. It is the hidden state that enters layer
    ``len(resnets) - 1 - layer`` of up block ``len(up_blocks) - 1 - block``, before its
    concatenation with the skip (the block's input when that layer does not exist)."""

    branch: int

    def resolve(self, gm: GraphModule) -> list[str]:
        prefix, names = _unet_prefix(gm, "DeepCache")
        ups = _indices(names, re.escape(prefix) + r"up_blocks\.(\d+)")
        block, layer = divmod(self.branch, 3)
        if block >= len(ups):
            raise CutError(f"DeepCache branch {self.branch} is out of range: this UNet has {len(ups)} up blocks, "
                           f"so branches 0..{3 * len(ups) - 1}")
        up = f"{prefix}up_blocks.{len(ups) - 1 - block}"
        resnets = _indices(names, re.escape(up) + r"\.resnets\.(\d+)")
        target = f"{up}.resnets.{max(len(resnets) - 1 - layer, 0)}"
        scopes = {n: scope(n) for n in gm.graph.nodes}
        for n in gm.graph.nodes:
            if (n.op == "call_function" and n.target == aten.cat.default and scopes[n] and scopes[n][-1] == up
                    and any(target in scopes[u] for u in n.users)):
                return [n.args[0][0].name]
        raise CutError(f"DeepCache: no concatenation of hidden state and skip feeds {target} in {up}; the up "
                       "block does not have the diffusers structure DeepCache patches")


@dataclasses.dataclass(frozen=True)
class EncoderCut:
    """FasterDiffusion's cut: the output of ``conv_in``, every down block (the skips) and the mid block."""

    def resolve(self, gm: GraphModule) -> list[str]:
        prefix, names = _unet_prefix(gm, "FasterDiffusion")
        downs = _indices(names, re.escape(prefix) + r"down_blocks\.(\d+)")
        modules = [f"{prefix}conv_in"] + [f"{prefix}down_blocks.{i}" for i in downs] + [f"{prefix}mid_block"]
        missing = [m for m in modules if m not in names]
        if missing:
            raise CutError(f"FasterDiffusion: the UNet has no {missing}")
        return ModuleCut(tuple(modules)).resolve(gm)
