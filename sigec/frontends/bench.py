"""``sigec bench``: time the dense model against the incremental engine for one edit mask.

The target's example inputs are the original; the edit replaces the spatial inputs' pixels
inside the mask with seeded noise. The engine records the original once, then every timed
incremental run edits that recording (``engine(*edited, mask=mask)``), so the runs are
repeatable. Latencies are the median, min and max over ``repeats`` runs after ``warmup`` runs.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from typing import Callable, Optional

import torch
from torch.utils import _pytree as pytree

import sigec
from sigec.frontends.measure import psnr, time_ms
from sigec.frontends.dump import CliError, Target, compile_target, flat_inputs


def edit_inputs(engine, target: Target, mask: torch.Tensor, seed: int = 0) -> tuple[tuple, dict]:
    """The example inputs with every spatial input's pixels inside ``mask`` replaced by seeded noise
    (each value moves by at least 0.1)."""
    leaves, spec = flat_inputs(target)
    if len(leaves) != len(engine.input_names):
        raise CliError(f"the target's example inputs have {len(leaves)} leaves but the engine expects "
                       f"{len(engine.input_names)} ({engine.input_names})")
    # offset the seed: example inputs are often torch.randn with a small seed themselves
    g = torch.Generator().manual_seed(0x5EED + seed)
    edited = list(leaves)
    for name in engine.context.spatial_inputs:
        i = engine.input_names.index(name)
        x = leaves[i]
        noise = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.dtype).to(x.device)
        noise = torch.where((noise - x).abs() < 0.1, noise + 0.5, noise)   # every masked pixel changes
        m = mask.view(*([1] * (x.dim() - 2)), *mask.shape).to(x.device)
        edited[i] = torch.where(m, noise, x)
    args, kwargs = pytree.tree_unflatten(edited, spec)
    return tuple(args), dict(kwargs)


def compare_outputs(dense, incremental) -> tuple[float, float]:
    """(lowest PSNR, largest absolute difference) over the floating-point tensor outputs."""
    a, _ = pytree.tree_flatten(dense)
    b, _ = pytree.tree_flatten(incremental)
    pairs = [(x, y) for x, y in zip(a, b) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
             and x.is_floating_point() and x.shape == y.shape]
    if len(a) != len(b) or not pairs:
        raise CliError("the engine's outputs do not match the model's (different structure or no tensors)")
    worst = min(psnr(y, x) for x, y in pairs)
    diff = max(float((x.double() - y.double()).abs().max()) if x.numel() else 0.0 for x, y in pairs)
    return worst, diff


def run_bench(target: Target, mask_for: Callable, policy: str = "sige", block_size: Optional[int] = None,
              repeats: int = 10, warmup: int = 1, threads: Optional[int] = None, seed: int = 0) -> dict:
    """Compile ``target``, record it, then time dense and incremental runs of an edit.

    ``mask_for(engine) -> (mask, description)`` gives the edit mask at the engine's resolution.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        engine = compile_target(target, policy, block_size)
        compile_s = time.perf_counter() - start
        mask, source = mask_for(engine)
        dense_model = target.dense_callable()
        args, kwargs = target.args, target.kwargs
        start = time.perf_counter()
        engine(*args, **kwargs)                       # record the original
        record_ms = (time.perf_counter() - start) * 1e3
        e_args, e_kwargs = edit_inputs(engine, target, mask, seed)

        def dense():
            with torch.no_grad():
                return dense_model(*e_args, **e_kwargs)

        def incremental():
            return engine(*e_args, mask=mask, **e_kwargs)

        dense_times = time_ms(dense, repeats, warmup)
        incr_times = time_ms(incremental, repeats, warmup)
        worst_psnr, max_diff = compare_outputs(dense(), incremental())
        report = engine.report(mask=mask)
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    dense_ms, incr_ms = statistics.median(dense_times), statistics.median(incr_times)
    inc = report.incremental_macs
    return {
        "sigec_version": sigec.__version__, "target": target.spec, "policy": policy,
        "block_size": block_size, "threads": used_threads, "repeats": repeats, "warmup": warmup,
        "mask": source, "mask_fraction": float(mask.float().mean()),
        "compile_s": compile_s, "record_ms": record_ms,
        "dense_ms": dense_ms, "dense_ms_min": min(dense_times), "dense_ms_max": max(dense_times),
        "incremental_ms": incr_ms, "incremental_ms_min": min(incr_times),
        "incremental_ms_max": max(incr_times), "speedup": dense_ms / incr_ms if incr_ms else math.inf,
        "dense_macs": report.dense_macs, "incremental_macs": inc,
        "mac_reduction": (report.dense_macs / inc) if inc else math.inf,
        "psnr_db": worst_psnr, "max_abs_diff": max_diff,
        "fallbacks": len(report.fallbacks()),
    }


def format_bench(r: dict) -> str:
    def latency(prefix: str) -> str:
        return f"{r[prefix + '_ms']:.2f} ms [{r[prefix + '_ms_min']:.2f}, {r[prefix + '_ms_max']:.2f}]"

    rows = [
        ("target", r["target"]),
        ("policy", f"{r['policy']} (block size {r['block_size'] or 'auto'}, {r['fallbacks']} fallback nodes)"),
        ("edit mask", f"{r['mask']} ({r['mask_fraction']:.1%} of pixels)"),
        ("runs", f"{r['repeats']} timed after {r['warmup']} warm-up, {r['threads']} threads"),
        ("compile / record", f"{r['compile_s']:.2f} s / {r['record_ms']:.1f} ms"),
        ("dense latency", latency("dense") + "  (median [min, max])"),
        ("incremental latency", latency("incremental")),
        ("speedup", f"{r['speedup']:.2f}x"),
        ("dense MACs", f"{r['dense_macs']:,}"),
        ("incremental MACs", f"{r['incremental_macs']:,}" if r["incremental_macs"] is not None else "-"),
        ("MAC reduction", f"{r['mac_reduction']:.2f}x"),
        ("PSNR (incr. vs dense)", f"{r['psnr_db']:.1f} dB (max |diff| {r['max_abs_diff']:.3g})"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows) + "\n"


def bench_json(r: dict) -> str:
    def clean(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v

    return json.dumps({k: clean(v) for k, v in r.items()}, indent=1) + "\n"
