"""The dump itself: a compiled engine evaluated on one edit mask (``Dump``, ``BlockMap``), and the
small formatters every output format shares."""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Mapping, Optional

import torch

import sigec
from sigec.frontends.dump.targets import Target
from sigec.ir import meta_keys as K
from sigec.runtime import masks as M

#: fill colours of the decisions (DOT, SVG, HTML)
DECISION_COLOURS = {"sparse": "#b6e3a8", "dense": "#d3d3d3", "fallback": "#f4a3a3", "static": "#ffffff"}
INPUT_COLOUR = "#c6dcff"


def shape_of(value) -> Any:
    if isinstance(value, torch.Tensor):
        return [int(d) for d in value.shape]
    if isinstance(value, (tuple, list)):
        return [shape_of(v) for v in value]
    return None


def format_shape(shape) -> str:
    if shape is None:
        return "-"
    if shape and isinstance(shape[0], list) or shape and shape[0] is None:
        return "(" + ", ".join(format_shape(s) for s in shape) + ")"
    return "x".join(str(d) for d in shape) if shape else "scalar"


def short_op(op: str) -> str:
    """``aten.conv2d.default`` -> ``conv2d``; ``aten.add.Tensor`` -> ``add.Tensor``."""
    if op.startswith("<built-in function "):
        return op[len("<built-in function "):-1]
    for prefix in ("aten.", "sigec."):
        if op.startswith(prefix):
            op = op[len(prefix):]
    return op[: -len(".default")] if op.endswith(".default") else op


def res_text(res) -> str:
    return f"{res[0]}x{res[1]}" if res else "-"


def pct_text(frac: Optional[float]) -> str:
    return f"{frac:.1%}" if frac is not None else "-"


def macs_text(value: Optional[int]) -> str:
    return f"{value:,}" if value is not None else "-"


@dataclasses.dataclass
class BlockMap:
    """One block grid of the incremental graph for the dumped mask."""

    index: int
    mask: str
    resolution: tuple[int, int]
    block: tuple[int, int]
    grid: tuple[int, int]
    active: list            #: [(row, col)] of the active blocks
    pixels: torch.Tensor    #: H x W bool: the grid's pixel mask
    nodes: list             #: names of the sparse nodes computed on this grid

    @property
    def fraction(self) -> float:
        return len(self.active) / max(1, self.grid[0] * self.grid[1])

    def rows(self) -> list[str]:
        """The grid as text, ``#`` for an active block and ``.`` for an inactive one."""
        cells = [["."] * self.grid[1] for _ in range(self.grid[0])]
        for r, c in self.active:
            cells[r][c] = "#"
        return ["".join(row) for row in cells]

    def to_json(self) -> dict:
        return {"index": self.index, "mask": self.mask, "resolution": list(self.resolution),
                "block": list(self.block), "grid": list(self.grid), "active_blocks": len(self.active),
                "total_blocks": self.grid[0] * self.grid[1], "active_fraction": self.fraction,
                "mask_fraction": float(self.pixels.float().mean()) if self.pixels.numel() else 0.0,
                "active": [list(rc) for rc in self.active], "rows": self.rows(), "nodes": list(self.nodes)}


@dataclasses.dataclass
class Dump:
    """Everything the renderers show; ``build_dump`` makes one."""

    target: str
    engine: Any
    report: Any
    stats: dict
    mask: torch.Tensor
    mask_source: str

    # -- pieces ---------------------------------------------------------------------------
    def settings(self) -> dict:
        s = self.engine.context.settings
        block = s.block_size
        return {"policy": s.policy, "eps": s.eps, "dilation": s.dilation, "threshold": s.threshold,
                "block_size": dict(block) if isinstance(block, Mapping) else block,
                "expected_active_fraction": s.expected_active_fraction,
                "spatial_inputs": list(self.engine.context.spatial_inputs)}

    def inputs(self) -> list[dict]:
        spatial = set(self.engine.context.spatial_inputs)
        out = []
        for node in self.engine.graph_module.graph.nodes:
            if node.op != "placeholder":
                continue
            val = node.meta.get("val")
            out.append({"name": node.name, "shape": shape_of(val),
                        "dtype": str(val.dtype).replace("torch.", "") if isinstance(val, torch.Tensor) else None,
                        "spatial": node.name in spatial})
        return out

    def nodes(self) -> list[dict]:
        by_name = {n.name: n for n in self.engine.graph_module.graph.nodes}
        rows = []
        for n in self.report.nodes:
            row = dataclasses.asdict(n)
            row["shape"] = shape_of(by_name[n.name].meta.get("val")) if n.name in by_name else None
            for key in ("resolution", "block", "halo"):
                row[key] = list(row[key]) if row[key] is not None else None
            rows.append(row)
        return rows

    def block_maps(self) -> list[BlockMap]:
        users: dict = collections.defaultdict(list)
        for node in self.engine.graph_module.graph.nodes:
            decision = node.meta.get(K.DECISION)
            if decision is not None and decision.kind.value == "sparse" and node.meta.get(K.GRID) is not None:
                users[(node.meta.get(K.MASK), node.meta[K.GRID])].append(node.name)
        maps = []
        for i, key in enumerate(self.engine.signature.blocks):
            expr, block = key
            res = tuple(expr.res)
            indices = self.stats["blocks"][key]
            maps.append(BlockMap(i, M.describe(expr), res, tuple(block), M.grid_shape(res, block),
                                 [(int(r), int(c)) for r, c in indices.tolist()], self.stats["masks"][expr],
                                 users.get(key, [])))
        return maps

    def totals(self) -> dict:
        rep = self.report
        inc = rep.incremental_macs
        counts = collections.Counter(n.decision for n in rep.nodes)
        return {"dense_macs": rep.dense_macs, "incremental_macs": inc,
                "ratio": (rep.dense_macs / inc) if inc else None,
                "input_mask_fraction": rep.input_mask_fraction,
                "nodes": len(rep.nodes),
                "decisions": {k: counts.get(k, 0) for k in ("sparse", "dense", "fallback", "static")},
                "fallbacks": rep.fallbacks()}

    def graphs(self) -> dict:
        return {"recording": self.engine.recording.code.strip("\n"),
                "incremental": self.engine.incremental.code.strip("\n")}

    def to_json(self) -> dict:
        res = self.engine.context.input_resolution
        return {"sigec_version": sigec.__version__, "target": self.target, "settings": self.settings(),
                "inputs": self.inputs(), "input_resolution": list(res),
                "mask": {"source": self.mask_source, "fraction": float(self.mask.float().mean()),
                         "pixels": int(self.mask.sum())},
                "totals": self.totals(), "nodes": self.nodes(),
                "block_maps": [b.to_json() for b in self.block_maps()], "graphs": self.graphs()}


def build_dump(target: Target, engine, mask: torch.Tensor, mask_source: str) -> Dump:
    """Evaluate ``mask`` on a compiled engine: ``report(mask=)`` and ``mask_stats(every_node=True)``."""
    report = engine.report(mask=mask)
    stats = engine.mask_stats(mask, every_node=True)
    return Dump(target.spec, engine, report, stats, mask, mask_source)
