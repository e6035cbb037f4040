"""``sigec.compile``, the front door: it picks the mode the options ask for (spatial edits, temporal
reuse, tiling), and ``sigec.core.pipeline`` checks the model, captures it once and hands the captured
program to that mode."""
from __future__ import annotations

from typing import Optional

import torch

from sigec.core.pipeline import Mode, compile_in_mode
from sigec.ir.costs import KernelCosts
from sigec.ir.settings import BlockSize, CompileSettings
from sigec.spatial import SpatialMode


def compile(model: "torch.nn.Module | torch.export.ExportedProgram", example_args=None,
            example_kwargs: Optional[dict] = None, *,
            policy: str = "sige", eps: float = 1e-6, dilation: int = 1, threshold: float = 0.0,
            block_size: BlockSize = None,
            expected_active_fraction: "float | tuple[float, ...]" = CompileSettings.expected_active_fraction,
            spatial_inputs=None, kernel_costs: Optional[KernelCosts] = None, cache_budget_bytes: Optional[int] = None,
            on_cache_full: str = "evict", on_stale: str = "rerecord",
            cache_dtype: Optional[torch.dtype] = None, temporal=None, scheduler=None,
            tiles: Optional[tuple[int, int]] = None, tile_size: "int | tuple[int, int] | None" = None,
            norm_stats: str = "exact") -> torch.nn.Module:
    """Compile ``model`` into an incremental ``Engine``.

    Args:
        model: any ``nn.Module`` that ``torch.export`` can capture (put it in eval mode), or an
            ``ExportedProgram`` (for example from ``torch.export.load("model.pt2")``).
        example_args: positional example inputs (a tensor or a tuple); optional for an
            ``ExportedProgram``, which carries its own.
        example_kwargs: keyword example inputs.
        policy, eps, dilation, threshold, block_size, expected_active_fraction, spatial_inputs,
            kernel_costs: see ``sigec.ir.settings.CompileSettings``.
        cache_budget_bytes: memory budget of the recorded slots (``None``: unbounded).
        on_cache_full: ``"evict"`` the least recently used slot, or ``"raise"``.
        on_stale: when parameters or buffers change in place after a slot was recorded:
            ``"rerecord"`` (drop every slot; the call records again) or ``"raise"``.
        cache_dtype: storage dtype of the cached activations (for example ``torch.bfloat16`` to
            halve the cache of an fp32 model); computation stays in the model's dtype, and an
            unedited input still returns the recorded output bit for bit.
        temporal, scheduler: reuse across denoising steps (``sigec.temporal``): a cut and schedule
            such as ``sigec.temporal.DeepCache(interval=3, branch=0)``, and the diffusers scheduler
            whose ``timesteps`` give the step index.
        tiles, tile_size, norm_stats: patch-by-patch execution in bounded memory (``sigec.tiling``):
            a (rows, cols) grid or a tile size in output pixels; ``norm_stats`` is ``"exact"``
            (statistics synchronized across tiles) or ``"preview"`` (estimated, an approximation).
    """
    from sigec.runtime import native  # (imported here: `python -m sigec.runtime.native` builds them alone)
    native.load()  # the native CPU kernels, built once per torch version; a warning if they cannot be
    cache = dict(cache_budget_bytes=cache_budget_bytes, on_cache_full=on_cache_full, cache_dtype=cache_dtype)
    if temporal is not None or tiles is not None or tile_size is not None:
        mode = _feature_mode(temporal=temporal, scheduler=scheduler, tiles=tiles, tile_size=tile_size,
                             norm_stats=norm_stats, policy=policy, eps=eps, dilation=dilation, threshold=threshold,
                             block_size=block_size, expected_active_fraction=expected_active_fraction,
                             spatial_inputs=spatial_inputs, kernel_costs=kernel_costs, on_stale=on_stale, **cache)
    else:
        settings = CompileSettings(policy=policy, eps=eps, dilation=dilation, threshold=threshold,
                                   block_size=block_size, expected_active_fraction=expected_active_fraction,
                                   spatial_inputs=tuple(spatial_inputs) if spatial_inputs is not None else None,
                                   kernel_costs=kernel_costs)
        mode = SpatialMode(settings, on_stale=on_stale, **cache)
    return compile_in_mode(mode, model, example_args, example_kwargs)


def _feature_mode(*, temporal, scheduler, tiles, tile_size, norm_stats, **options) -> Mode:
    """The temporal or tiled mode (imported on first use: most programs never need them)."""
    if temporal is not None:
        from sigec.temporal import TemporalMode
        return TemporalMode(temporal, scheduler, **options)
    from sigec.tiling import TiledMode
    return TiledMode(tiles=tiles, tile_size=tile_size, norm_stats=norm_stats, **options)
