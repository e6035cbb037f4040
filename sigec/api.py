"""``sigec.compile``: capture, analyse, generate code, wrap in an ``Engine``."""
from __future__ import annotations

from typing import Optional

import torch

from sigec.capture import capture, copy_graph_module
from sigec.codegen import emit_incremental, emit_recording
from sigec.costs import KernelCosts
from sigec.engine import Engine, Plan
from sigec.passes import ANALYSIS_PASSES, INCREMENTAL_PASSES, PassContext, run_passes
from sigec.runtime.cache import SlotStore
from sigec.settings import BlockSize, CompileSettings


def compile(model: "torch.nn.Module | torch.export.ExportedProgram", example_args=None,
            example_kwargs: Optional[dict] = None, *,
            policy: str = "sige", eps: float = 1e-6, dilation: int = 1, threshold: float = 0.0,
            block_size: BlockSize = None,
            expected_active_fraction: "float | tuple[float, ...]" = CompileSettings.expected_active_fraction,
            spatial_inputs=None, kernel_costs: Optional[KernelCosts] = None, cache_budget_bytes: Optional[int] = None,
            on_cache_full: str = "evict", on_stale: str = "rerecord",
            cache_dtype: Optional[torch.dtype] = None, temporal=None, scheduler=None,
            tiles: Optional[tuple[int, int]] = None, tile_size: "int | tuple[int, int] | None" = None,
            norm_stats: str = "exact"):
    """Compile ``model`` into an incremental ``Engine``.

    Args:
        model: any ``nn.Module`` that ``torch.export`` can capture (put it in eval mode), or an
            ``ExportedProgram`` (for example from ``torch.export.load("model.pt2")``).
        example_args: positional example inputs (a tensor or a tuple); optional for an
            ``ExportedProgram``, which carries its own.
        example_kwargs: keyword example inputs.
        policy, eps, dilation, threshold, block_size, expected_active_fraction, spatial_inputs,
            kernel_costs: see ``sigec.settings.CompileSettings``.
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
    options = dict(policy=policy, eps=eps, dilation=dilation, threshold=threshold, block_size=block_size,
                   expected_active_fraction=expected_active_fraction, spatial_inputs=spatial_inputs,
                   kernel_costs=kernel_costs, cache_budget_bytes=cache_budget_bytes, on_cache_full=on_cache_full,
                   on_stale=on_stale, cache_dtype=cache_dtype)
    if temporal is not None:
        from sigec.temporal import compile_temporal
        return compile_temporal(model, example_args, example_kwargs, temporal=temporal, scheduler=scheduler,
                                **options)
    if tiles is not None or tile_size is not None:
        from sigec.tiling import compile_tiled
        return compile_tiled(model, example_args, example_kwargs, tiles=tiles, tile_size=tile_size,
                             norm_stats=norm_stats, **options)
    return _compile_spatial(model, example_args, example_kwargs, **options)


def _plan(captured: torch.fx.GraphModule, settings: CompileSettings, inplace: bool) -> Plan:
    """Analyse a copy of the captured graph for one planned edit area and emit its incremental graph."""
    gm = copy_graph_module(captured)
    ctx = PassContext(settings)
    gm = run_passes(gm, ctx, ANALYSIS_PASSES)
    incremental, signature = emit_incremental(gm, ctx.batch, inplace=inplace)
    ctx.dense_graph = gm
    incremental = run_passes(incremental, ctx, INCREMENTAL_PASSES)
    return Plan(settings.expected_active_fraction, gm, ctx, incremental, signature)


def _compile_spatial(model, example_args, example_kwargs, *, policy, eps, dilation, threshold, block_size,
                     expected_active_fraction, spatial_inputs, kernel_costs, cache_budget_bytes, on_cache_full,
                     on_stale, cache_dtype) -> Engine:
    """The spatial (edit-incremental) engine: capture, analysis passes, both codegens, an ``Engine``."""
    if example_kwargs and "mask" in example_kwargs:
        raise ValueError("the model takes a keyword input named 'mask', which is the engine's own edit-mask "
                         "argument; pass the model's mask positionally in example_args (and in calls)")
    settings = CompileSettings(policy=policy, eps=eps, dilation=dilation, threshold=threshold,
                               block_size=block_size, expected_active_fraction=expected_active_fraction,
                               spatial_inputs=tuple(spatial_inputs) if spatial_inputs is not None else None,
                               kernel_costs=kernel_costs)
    if isinstance(model, torch.nn.Module) and model.training:
        raise ValueError(f"{type(model).__name__} is in training mode (dropout and batch norm would not "
                         "match an eval run, and batch norm would update its statistics): call model.eval() "
                         "before sigec.compile")
    if example_args is not None and not isinstance(example_args, tuple):
        example_args = (example_args,)
    captured = capture(model, example_args, example_kwargs)
    # scatters write into the cached tensors in place unless the cache is stored narrower
    model_dtypes = {p.dtype for p in captured.gm.parameters() if p.is_floating_point()}
    inplace = cache_dtype is None or model_dtypes == {cache_dtype}
    plans = [_plan(captured.gm, settings.for_plan(f), inplace) for f in settings.planned_fractions]
    cache_keys = list(dict.fromkeys(key for plan in plans for key in plan.signature.caches))
    recording = emit_recording(plans[0].graph_module, cache_keys)
    store = SlotStore(cache_budget_bytes, on_cache_full)
    return Engine(plans, recording, cache_keys, captured.in_spec, captured.out_spec,
                  captured.input_names, store, source=model if isinstance(model, torch.nn.Module) else None,
                  on_stale=on_stale, cache_dtype=cache_dtype)
