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
from sigec.passes.tile_plan import TilingError
from sigec.tiling.mode import NORM_STATS, TiledMode, compile_tiled
from sigec.tiling.module import PreviewStatistics, TiledModule
from sigec.tiling.report import TileReport, build_tile_report, node_table, parse_tiles, render_plan

__all__ = ["compile_tiled", "TiledModule", "TilingError", "TileReport", "TiledMode", "NORM_STATS", "PreviewStatistics",
           "build_tile_report", "node_table", "parse_tiles", "render_plan"]
