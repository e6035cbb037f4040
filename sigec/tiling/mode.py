"""The tiled mode: the tiling passes over the captured program, then a ``TiledModule`` that runs the plan."""
from __future__ import annotations

from typing import Optional

import torch

from sigec.core.pipeline import Program, compile_in_mode
from sigec.ir.settings import CompileSettings
from sigec.passes import TILING_PASSES, run_passes
from sigec.passes.tile_plan import TilingContext, TilingError
from sigec.tiling.module import PreviewStatistics, TiledModule

NORM_STATS = ("exact", "preview")
#: the default preview subsampling is the larger grid dimension, capped at this
PREVIEW_MAX_FACTOR = 4

#: compile options of the edit-incremental engine and their defaults: they mean nothing here
_INCREMENTAL_ONLY = dict(policy="sige", eps=1e-6, dilation=1, threshold=0.0, block_size=None,
                         expected_active_fraction=CompileSettings.expected_active_fraction, on_stale="rerecord",
                         kernel_costs=None)


class TiledMode:
    """``sigec.compile(..., tiles=...)`` or ``tile_size=...``; the options are checked here, before capture.

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

    input_error = TilingError
    takes_edit_mask = False

    def __init__(self, *, tiles=None, tile_size=None, norm_stats: str = "exact", spatial_inputs=None,
                 cache_budget_bytes: Optional[int] = None, on_cache_full: str = "evict",
                 cache_dtype: Optional[torch.dtype] = None, whole_below_bytes: Optional[int] = None,
                 preview_factor: Optional[int] = None, **incremental_options):
        for name, value in incremental_options.items():
            if name not in _INCREMENTAL_ONLY:
                raise TypeError(f"compile_tiled() got an unexpected keyword argument {name!r}")
            if value != _INCREMENTAL_ONLY[name]:
                raise TilingError(f"{name}={value!r} configures edit-incremental engines and has no meaning with "
                                  f"tiles=/tile_size=; leave it at its default ({_INCREMENTAL_ONLY[name]!r})")
        if norm_stats not in NORM_STATS:
            raise TilingError(f"norm_stats must be one of {NORM_STATS}, got {norm_stats!r}")
        if on_cache_full not in ("evict", "raise"):
            raise TilingError(f"on_cache_full must be 'evict' (recompute to fit) or 'raise', got {on_cache_full!r}")
        if cache_budget_bytes is not None and (not isinstance(cache_budget_bytes, int) or cache_budget_bytes <= 0):
            raise TilingError(f"cache_budget_bytes must be a positive int or None, got {cache_budget_bytes!r}")
        if cache_dtype is not None and not (isinstance(cache_dtype, torch.dtype) and cache_dtype.is_floating_point):
            raise TilingError(f"cache_dtype must be a floating torch.dtype or None, got {cache_dtype!r}")
        self.tiles, self.tile_size, self.norm_stats = tiles, tile_size, norm_stats
        self.spatial_inputs = tuple(spatial_inputs) if spatial_inputs is not None else None
        self.cache_budget_bytes, self.on_cache_full, self.cache_dtype = cache_budget_bytes, on_cache_full, cache_dtype
        self.whole_below_bytes, self.preview_factor = whole_below_bytes, preview_factor

    def build(self, program: Program) -> TiledModule:
        captured = program.captured
        ctx = TilingContext(CompileSettings(spatial_inputs=self.spatial_inputs), tiles=self.tiles,
                            tile_size=self.tile_size, norm_stats=self.norm_stats, budget_bytes=self.cache_budget_bytes,
                            on_full=self.on_cache_full, hold_dtype=self.cache_dtype,
                            whole_below_bytes=self.whole_below_bytes)
        gm = run_passes(captured.gm, ctx, TILING_PASSES)
        preview = None
        if self.norm_stats == "preview":
            # about one tile's pixels, but never subsampled by more than 4: statistics of fewer pixels drift
            # (SD VAE decoder, 1024x1024: 51 dB against untiled at a factor of 4, 35 dB at 8)
            factor = self.preview_factor or min(PREVIEW_MAX_FACTOR, max(ctx.grid.shape))
            preview = PreviewStatistics(program, ctx, factor, gm)
        return TiledModule(gm, ctx, captured.in_spec, captured.out_spec, captured.input_names, preview)


def compile_tiled(model: "torch.nn.Module | torch.export.ExportedProgram", example_args=None,
                  example_kwargs: Optional[dict] = None, **options) -> TiledModule:
    """Compile ``model`` to run patch by patch (``sigec.tiling``'s docstring); the options are ``TiledMode``'s."""
    return compile_in_mode(TiledMode(**options), model, example_args, example_kwargs)
