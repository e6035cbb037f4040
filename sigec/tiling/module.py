"""``TiledModule``, which runs a tile plan, and the preview pass of ``norm_stats="preview"``."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from sigec.core import inputs
from sigec.core.pipeline import Program
from sigec.ir import meta_keys as K
from sigec.passes.tile_geometry import TileKind
from sigec.passes.tile_plan import TilePlan, TilingContext, TilingError
from sigec.runtime.tiled import NormStatistics, TiledRunner, release_freed_memory
from sigec.tiling.report import TileReport, build_tile_report


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
        return inputs.flatten_inputs(args, kwargs, self._in_spec, self.input_names, self._examples, None, TilingError)

    def _apply(self, fn, recurse=True):
        raise TilingError("a tiled module is specialized to its model's dtype and device: move the model and "
                          "compile again")

    def report(self) -> "TileReport":
        return build_tile_report(self)



class PreviewStatistics:
    """Norm statistics from the model run untiled on spatial inputs subsampled by ``factor``
    (every ``factor``-th pixel, which keeps the inputs' per-pixel distribution). An approximation:
    the statistics of a smaller image, not of this one."""

    def __init__(self, program: Program, ctx: TilingContext, factor: int, gm):
        if not isinstance(program.model, torch.nn.Module):
            raise TilingError("norm_stats='preview' captures the model again at the preview size, which needs the "
                              "nn.Module, not an ExportedProgram")
        if not isinstance(factor, int) or factor < 1:
            raise TilingError(f"preview_factor must be a positive int, got {factor!r}")
        self.factor = factor
        self.spatial = [program.captured.input_names.index(n) for n in ctx.spatial_inputs]
        leaves, spec = pytree.tree_flatten((program.example_args or (), program.example_kwargs or {}))
        small = self.subsample(list(leaves))
        args, kwargs = pytree.tree_unflatten(small, spec)
        try:
            self.captured = program.recapture(tuple(args), kwargs)
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
