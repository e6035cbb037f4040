"""What a tile plan looks like: ``TiledModule.report()`` and the views of ``sigec dump --tiles``."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from sigec.ir import meta_keys as K
from sigec.ir.plan import SpatialKind
from sigec.passes.tile_plan import TileGrid, TilingError, halos, resolution, untiled_estimate

if TYPE_CHECKING:
    from sigec.tiling.module import TiledModule


@dataclasses.dataclass
class TileReport:
    """The plan in numbers: grid, phases, synchronization points, held values, halos, estimates."""

    grid: TileGrid
    norm_stats: str
    tiles: list            # [(tile, output region)]
    phases: list           # per phase: dict(whole=[names], sync=[norm names], tiled=int, held_written=[...])
    held: list             # [(name, resolution, MiB, dtype)]
    recomputed: list       # [name]
    whole: list            # [(name, reason)]
    halos: dict            # resolution -> (rows, cols) largest halo there
    estimated_peak_bytes: int
    untiled_peak_bytes: int
    estimated_macs: float
    untiled_macs: float
    choice: str
    whole_threshold: int
    #: the preview pass's own estimated peak (``norm_stats="preview"``; it runs before the tiles)
    preview_peak_bytes: int = 0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["grid"] = {"output": list(self.grid.output), "rows": list(self.grid.rows), "cols": list(self.grid.cols)}
        d["halos"] = {f"{r[0]}x{r[1]}": list(h) for r, h in self.halos.items()}
        return d

    def __str__(self) -> str:
        g = self.grid
        lines = [f"tiled plan: {g.shape[0]}x{g.shape[1]} tiles over the {g.output[0]}x{g.output[1]} output, "
                 f"norm statistics {self.norm_stats}"
                 + (" (estimated from a subsampled pass: an approximation)" if self.norm_stats == "preview" else "")]
        lines.append("tiles (output rows x cols): " + ", ".join(
            f"{t[0]},{t[1]}: [{r[0][0]}:{r[0][1]}, {r[1][0]}:{r[1][1]}]" for t, r in self.tiles[:16])
            + (f" ... (+{len(self.tiles) - 16})" if len(self.tiles) > 16 else ""))
        lines.append("halos (largest reach past a tile, rows x cols): " + ", ".join(
            f"{r[0]}x{r[1]}: {h[0]}x{h[1]}" for r, h in sorted(self.halos.items(), reverse=True)))
        lines.append(f"phases: {len(self.phases)}")
        for i, ph in enumerate(self.phases):
            parts = []
            if ph["whole"]:
                parts.append(f"whole {len(ph['whole'])} ({_names(ph['whole'])})")
            if ph["tiled"]:
                parts.append(f"{ph['tiled']} tiled values x {ph['programs']} tiles")
            if ph["sync"]:
                parts.append(f"sync {_names(ph['sync'])}")
            if ph["held_written"]:
                parts.append(f"holds {_names(ph['held_written'])}")
            lines.append(f"  phase {i}: " + "; ".join(parts))
        if self.held:
            total = sum(h[2] for h in self.held)
            lines.append(f"held between phases ({len(self.held)}, {total:.1f} MiB in all, not all at once): "
                         + ", ".join(f"{n} {r[0]}x{r[1]} {mib:.1f} MiB {dt}" for n, r, mib, dt in self.held[:8])
                         + (" ..." if len(self.held) > 8 else ""))
        lines.append(f"recomputed instead of held ({len(self.recomputed)}): {_names(self.recomputed) or '-'}; "
                     f"choice: {self.choice}")
        if self.whole:
            reasons: dict = {}
            for name, why in self.whole:
                reasons.setdefault(why, []).append(name)
            lines.append("whole (untiled) values:")
            for why, names in reasons.items():
                lines.append(f"  {len(names):4d} x {why}: {_names(names)}")
        ratio = self.estimated_peak_bytes / self.untiled_peak_bytes if self.untiled_peak_bytes else float("nan")
        work = self.estimated_macs / self.untiled_macs if self.untiled_macs else float("nan")
        preview = (f", the larger of the tiles' and the preview pass's {self.preview_peak_bytes / 2**20:.1f} MiB"
                   if self.preview_peak_bytes else "")
        lines.append(f"estimated peak memory: {self.estimated_peak_bytes / 2**20:.1f} MiB "
                     f"(untiled {self.untiled_peak_bytes / 2**20:.1f} MiB, {ratio:.0%}{preview}); estimated work "
                     f"{work:.2f}x untiled")
        lines.append("  (the estimate counts tensors: values, held bands, padded and NHWC input copies; not the "
                     "allocator's slack, oneDNN's weight reorders and scratch, or the Python heap)")
        return "\n".join(lines)


def _names(names: list, limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit})" if len(names) > limit else "")


def build_tile_report(module: "TiledModule") -> TileReport:
    plan, ctx, gm = module.plan, module.context, module.graph_module
    grid = ctx.grid
    phases = []
    for p in range(plan.phases):
        progs = plan.programs.get(p, [])
        computed = {s.node for prog in progs for s in prog.steps if s.action == "compute"}
        written = sorted({s.node.name for prog in progs for s in prog.steps if s.write_held})
        sync = sorted({norm.name for prog in progs for s in prog.steps for norm in s.stats})
        phases.append(dict(whole=[n.name for n in plan.whole.get(p, [])], tiled=len(computed), programs=len(progs),
                           sync=sync, held_written=written))
    held = sorted(((v.name, resolution(v), plan.held_bytes[v] / 2**20,
                    str(plan.hold_dtype or v.meta["val"].dtype).replace("torch.", "")) for v in plan.held),
                  key=lambda h: -h[2])
    whole = [(n.name, n.meta[K.SCHEDULE].reason) for n in gm.graph.nodes
             if n.op == "call_function" and n.meta[K.SCHEDULE].mode == "whole"
             and n.meta[K.SPATIAL].kind is not SpatialKind.STATIC]
    by_res: dict = {}
    for node, h in halos(plan).items():
        res = resolution(node)
        old = by_res.get(res, (0, 0))
        by_res[res] = (max(old[0], h[0]), max(old[1], h[1]))
    cost, peak = untiled_estimate(gm)
    preview_peak = untiled_estimate(module._preview.captured.gm)[1] if module._preview is not None else 0
    return TileReport(grid, ctx.norm_stats, [(t, grid.owned(grid.output, t)) for t in grid.tiles()], phases, held,
                      sorted(v.name for v in plan.dropped), whole, by_res, max(plan.estimated_peak_bytes, preview_peak),
                      peak, plan.estimated_macs, cost, plan.choice, ctx.whole_threshold, preview_peak)




def parse_tiles(text: str) -> tuple[int, int]:
    """``"4"`` or ``"4x2"`` (rows x cols) -> ``(rows, cols)``."""
    parts = text.lower().split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise TilingError(f"--tiles takes N or ROWSxCOLS (say 4 or 4x2), got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise TilingError(f"--tiles takes N or ROWSxCOLS (say 4 or 4x2), got {text!r}")
    return values


def node_table(module: "TiledModule") -> list[dict]:
    """One row per computed value: op, resolution, mode (tiled / whole), phase, held, halo, why whole."""
    found = halos(module.plan)
    rows = []
    for n in module.graph_module.graph.nodes:
        if n.op != "call_function":
            continue
        sched = n.meta[K.SCHEDULE]
        if sched.mode in ("source", "ignored"):
            continue
        res = resolution(n)
        rows.append(dict(node=n.name, op=str(n.target).replace("aten.", ""), resolution=list(res) if res else None,
                         kind=n.meta[K.TILE].kind.value, mode=sched.mode, phase=sched.phase,
                         held=n in module.plan.held, recomputed=n in module.plan.dropped,
                         halo=list(found[n]) if n in found else None, reason=sched.reason))
    return rows


def render_plan(module: "TiledModule", fmt: str = "text") -> str:
    """The plan as ``sigec dump --tiles`` shows it: the report and the per-value table (text or json)."""
    import json

    report = module.report()
    table = node_table(module)
    if fmt == "json":
        return json.dumps({"plan": report.as_dict(), "nodes": table}, indent=2) + "\n"
    if fmt != "text":
        raise TilingError(f"sigec dump --tiles prints text or json, not {fmt}")
    head = f"{'node':32s} {'op':28s} {'res':>9s} {'kind':10s} {'mode':6s} {'phase':>5s} {'held':>5s} {'halo':>6s}"
    lines = [str(report), "", head, "-" * len(head)]
    for r in table:
        res = f"{r['resolution'][0]}x{r['resolution'][1]}" if r["resolution"] else "-"
        held = "yes" if r["held"] else ("re" if r["recomputed"] else "")
        halo = f"{r['halo'][0]}x{r['halo'][1]}" if r["halo"] else "-"
        lines.append(f"{r['node'][:32]:32s} {r['op'][:28]:28s} {res:>9s} {r['kind']:10s} {r['mode']:6s} "
                     f"{r['phase']:>5d} {held:>5s} {halo:>6s}")
    return "\n".join(lines) + "\n"
