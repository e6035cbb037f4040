"""Patch-wise execution in bounded memory: ``sigec.compile(model, args, tiles=(rows, cols))``.

The model is captured once; the passes ``classify_spatial``, ``classify_tiling`` and
``schedule_tiles`` give every value a tiling rule, a phase and a place (computed per tile,
whole, or held between phases), and ``runtime/tiled.py`` runs the plan. Local ops run per tile
with exactly the halo their windows need, so the output equals the untiled model's.
Normalization statistics are summed over every tile before they are applied
(``norm_stats="exact"``), or estimated beforehand from a pass over inputs subsampled by
``preview_factor`` (``norm_stats="preview"``: one phase, lower memory, an approximation).
Attention and other global ops run whole, at their own resolution.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import torch
from torch.fx._pytree import tree_flatten_spec
from torch.utils import _pytree as pytree

from sigec import meta_keys as K
from sigec.capture import capture
from sigec.passes import TILING_PASSES, run_passes
from sigec.passes.classify_tiling import TileKind
from sigec.passes.schedule_tiles import (TileGrid, TilePlan, TilingContext, TilingError, halos, resolution,
                                         untiled_estimate)
from sigec.plan import SpatialKind
from sigec.runtime.tiled import NormStatistics, TiledRunner, release_freed_memory
from sigec.settings import CompileSettings

log = logging.getLogger("sigec.tiling")

NORM_STATS = ("exact", "preview")
#: the default preview subsampling is the larger grid dimension, capped at this
PREVIEW_MAX_FACTOR = 4

#: compile options of the edit-incremental engine and their defaults: they mean nothing here
_INCREMENTAL_ONLY = dict(policy="sige", eps=1e-6, dilation=1, threshold=0.0, block_size=None,
                         expected_active_fraction=CompileSettings.expected_active_fraction, on_stale="rerecord",
                         kernel_costs=None)

__all__ = ["compile_tiled", "TiledModule", "TilingError", "TileReport"]


def compile_tiled(model: "torch.nn.Module | torch.export.ExportedProgram", example_args=None,
                  example_kwargs: Optional[dict] = None, *, tiles=None, tile_size=None, norm_stats: str = "exact",
                  spatial_inputs=None, cache_budget_bytes: Optional[int] = None, on_cache_full: str = "evict",
                  cache_dtype: Optional[torch.dtype] = None, whole_below_bytes: Optional[int] = None,
                  preview_factor: Optional[int] = None, **incremental_options) -> "TiledModule":
    """Compile ``model`` to run patch by patch (see the module docstring).

    Args:
        tiles: ``(rows, cols)`` of tiles over the model's output (its largest image output).
        tile_size: instead of ``tiles``, the tile size in output pixels (an int or ``(h, w)``).
        norm_stats: ``"exact"`` (statistics synchronized across tiles; equals the untiled model) or
            ``"preview"`` (statistics from a pass over subsampled inputs: an approximation).
        spatial_inputs: names of the image inputs (default: every 4-D floating input).
        cache_budget_bytes: target for the estimated peak memory; the planner recomputes values
            instead of holding them until the estimate fits (``None``: smallest time x memory).
        on_cache_full: ``"evict"`` (recompute to fit the budget) or ``"raise"`` (never recompute;
            raise when holding every value later phases read exceeds the budget).
        cache_dtype: storage dtype of the values held between phases (``None``: their own; a
            narrower one halves their memory at a small, reported loss of precision).
        whole_below_bytes: resolutions whose largest value is at most this run untiled (default:
            the largest value divided by the number of tiles; 0 tiles every resolution).
        preview_factor: subsampling of the preview pass (default: the larger grid dimension, at most 4).
        incremental_options: the edit-incremental engine's options (policy, eps, dilation, ...)
            are accepted at their defaults and refused otherwise.
    """
    for name, value in incremental_options.items():
        if name not in _INCREMENTAL_ONLY:
            raise TypeError(f"compile_tiled() got an unexpected keyword argument {name!r}")
        if value != _INCREMENTAL_ONLY[name]:
            raise TilingError(f"{name}={value!r} configures edit-incremental engines and has no meaning with tiles=/"
                              f"tile_size=; leave it at its default ({_INCREMENTAL_ONLY[name]!r})")
    if norm_stats not in NORM_STATS:
        raise TilingError(f"norm_stats must be one of {NORM_STATS}, got {norm_stats!r}")
    if on_cache_full not in ("evict", "raise"):
        raise TilingError(f"on_cache_full must be 'evict' (recompute to fit) or 'raise', got {on_cache_full!r}")
    if cache_budget_bytes is not None and (not isinstance(cache_budget_bytes, int) or cache_budget_bytes <= 0):
        raise TilingError(f"cache_budget_bytes must be a positive int or None, got {cache_budget_bytes!r}")
    if cache_dtype is not None and not (isinstance(cache_dtype, torch.dtype) and cache_dtype.is_floating_point):
        raise TilingError(f"cache_dtype must be a floating torch.dtype or None, got {cache_dtype!r}")
    if isinstance(model, torch.nn.Module) and model.training:
        raise TilingError(f"{type(model).__name__} is in training mode (batch norm would use batch statistics); "
                          "call model.eval() before compiling")
    if example_args is not None and not isinstance(example_args, tuple):
        example_args = (example_args,)
    captured = capture(model, example_args, example_kwargs)
    settings = CompileSettings(spatial_inputs=tuple(spatial_inputs) if spatial_inputs is not None else None)
    ctx = TilingContext(settings, tiles=tiles, tile_size=tile_size, norm_stats=norm_stats, budget_bytes=cache_budget_bytes, on_full=on_cache_full,
                        hold_dtype=cache_dtype, whole_below_bytes=whole_below_bytes)
    gm = run_passes(captured.gm, ctx, TILING_PASSES)
    preview = None
    if norm_stats == "preview":
        # about one tile's pixels, but never subsampled by more than 4: statistics of fewer pixels drift
        # (SD VAE decoder, 1024x1024: 51 dB against untiled at a factor of 4, 35 dB at 8)
        factor = preview_factor or min(PREVIEW_MAX_FACTOR, max(ctx.grid.shape))
        preview = PreviewStatistics(model, example_args, example_kwargs, captured.input_names, ctx, factor, gm)
    return TiledModule(gm, ctx, captured.in_spec, captured.out_spec, captured.input_names, preview)


class TiledModule(torch.nn.Module):
    """Computes the model's output tile by tile; ``report()`` shows the plan.

    Attributes:
        graph_module: the captured graph; ``node.meta`` holds each value's tiling rule and schedule.
        plan: the ``TilePlan`` (phases, per-tile programs, held values, estimates).
        context: the ``TilingContext`` (grid and settings).
    """

    def __init__(self, gm, ctx: TilingContext, in_spec, out_spec, input_names: list, preview=None):
        super().__init__()
        self.graph_module = gm
        self.context = ctx
        self.plan: TilePlan = ctx.plan
        self._in_spec, self._out_spec = in_spec, out_spec
        self.input_names = input_names
        self._examples = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
        self._preview = preview
        self._runner = TiledRunner(gm, self.plan, ctx.grid)

    def forward(self, *args, **kwargs) -> Any:
        flat = self._flatten(args, kwargs)
        with torch.no_grad():
            if self._preview is not None:
                self._runner.norm_stats = self._preview(flat)
                release_freed_memory()  # the preview pass's buffers, before the tiles need memory
            try:
                out = self._runner.run(flat)
            finally:
                self._runner.norm_stats = None
        return pytree.tree_unflatten(out, self._out_spec)

    def _flatten(self, args, kwargs) -> list:
        try:
            flat = tree_flatten_spec((args, kwargs), self._in_spec)
        except Exception as exc:
            raise TilingError(f"the call's arguments do not match the example inputs' structure "
                              f"({self.input_names}): {exc}") from exc
        for name, value, example in zip(self.input_names, flat, self._examples):
            if isinstance(example, torch.Tensor):
                if not isinstance(value, torch.Tensor):
                    raise TilingError(f"input {name!r} must be a tensor, got {type(value).__name__}")
                if tuple(value.shape) != tuple(example.shape) or value.dtype != example.dtype:
                    raise TilingError(f"input {name!r} has shape {tuple(value.shape)} and dtype {value.dtype}, but the "
                                      f"module was compiled for {tuple(example.shape)} and {example.dtype}; compile "
                                      "again with example inputs of the new shape")
        return list(flat)

    def _apply(self, fn, recurse=True):
        raise TilingError("a tiled module is specialized to its model's dtype and device: move the model and "
                          "compile again")

    def report(self) -> "TileReport":
        return build_tile_report(self)


# ---------------------------------------------------------------------------------------------
# preview statistics


class PreviewStatistics:
    """Norm statistics from the model run untiled on spatial inputs subsampled by ``factor``
    (every ``factor``-th pixel, which keeps the inputs' per-pixel distribution). An approximation:
    the statistics of a smaller image, not of this one."""

    def __init__(self, model, example_args, example_kwargs, input_names, ctx: TilingContext, factor: int, gm):
        if not isinstance(model, torch.nn.Module):
            raise TilingError("norm_stats='preview' captures the model again at the preview size, which needs the "
                              "nn.Module, not an ExportedProgram")
        if not isinstance(factor, int) or factor < 1:
            raise TilingError(f"preview_factor must be a positive int, got {factor!r}")
        self.factor = factor
        self.spatial = [input_names.index(n) for n in ctx.spatial_inputs]
        leaves, spec = pytree.tree_flatten((example_args or (), example_kwargs or {}))
        small = self.subsample(list(leaves))
        args, kwargs = pytree.tree_unflatten(small, spec)
        try:
            self.captured = capture(model, tuple(args), kwargs)
        except Exception as exc:
            raise TilingError(f"the preview pass could not capture the model on inputs subsampled by {factor} "
                              f"({tuple(small[self.spatial[0]].shape)}): {str(exc).splitlines()[0]}; choose a "
                              "preview_factor the model accepts") from exc
        self.norms = {n.name for n in gm.graph.nodes
                      if n.op == "call_function" and n.meta[K.SCHEDULE].mode == "tiled"
                      and n.meta[K.TILE].kind is TileKind.NORM}
        self.groups = {n.name: n.meta[K.TILE].geometry.groups for n in gm.graph.nodes if n.name in self.norms}
        preview_nodes = {n.name: n for n in self.captured.gm.graph.nodes}
        missing = [name for name in self.norms
                   if name not in preview_nodes or preview_nodes[name].target != _target(gm, name)]
        if missing:
            raise TilingError(f"the preview graph differs from the model's at {missing[:5]}: the model takes another "
                              "path at the preview size; use norm_stats='exact'")

    def subsample(self, flat: list) -> list:
        out = list(flat)
        f = self.factor
        for i in self.spatial:
            x = out[i]
            h, w = x.shape[-2:]
            if h % f == 0 and w % f == 0:
                out[i] = x[..., ::f, ::f].contiguous()
            else:
                out[i] = torch.nn.functional.interpolate(x, size=(max(1, h // f), max(1, w // f)), mode="nearest")
        return out

    def __call__(self, flat: list) -> dict:
        stats: dict = {}
        norms, groups = self.norms, self.groups

        class Recorder(torch.fx.Interpreter):
            def run_node(self, n):
                if n.name in norms:
                    acc = NormStatistics(groups[n.name])
                    acc.add(self.env[n.args[0]])
                    stats[n.name] = acc.mean_var()
                return super().run_node(n)

        Recorder(self.captured.gm).run(*self.subsample(flat))
        return stats


def _target(gm, name: str):
    return next(n.target for n in gm.graph.nodes if n.name == name)


# ---------------------------------------------------------------------------------------------
# report


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


def build_tile_report(module: TiledModule) -> TileReport:
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



# ---------------------------------------------------------------------------------------------
# sigec dump --tiles


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


def node_table(module: TiledModule) -> list[dict]:
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


def render_plan(module: TiledModule, fmt: str = "text") -> str:
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
