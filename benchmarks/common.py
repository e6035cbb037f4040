"""Shared helpers of the benchmarks: edit masks, the edit runner, timing and JSON output."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

from sigec.core import cuda_graphs
from sigec.frontends import edits
from sigec.frontends.measure import psnr, summary, time_ms  # noqa: F401  (psnr is re-exported)


def ellipse_mask(h: int, w: int, fraction: float) -> torch.Tensor:
    """The benchmark's edit: an off-centre ellipse (aspect 1.5) covering ``fraction`` of the image.

    Off-centre because a centred edit is the friendliest case for block grids.
    """
    return edits.ellipse_mask(h, w, fraction, centre=(0.6, 0.4), aspect=1.5)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def time_call(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, float, float]:
    """Wall-clock seconds of ``fn()``: ``(median, min, max)`` over ``repeats`` calls after ``warmup``."""
    return tuple(t / 1e3 for t in summary(time_ms(fn, repeats, warmup)))


def _jsonable(obj: Any) -> Any:
    """Recursively convert to JSON types; non-finite floats become ``None`` (JSON has no inf)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):  # numpy scalars
        return _jsonable(obj.item())
    return str(obj)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path``, creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# the edit runner shared by the model benchmarks


@dataclasses.dataclass
class EditCase:
    """What a model benchmark measures.

    ``edit(inputs, mask) -> (edited inputs, effective mask)``: the effective mask is where the
    inputs really differ (it may reach past ``mask``, as instance edges do). ``output(result)``
    picks the image out of the model's result.
    """

    name: str
    model: torch.nn.Module
    inputs: tuple
    edit: Callable[[tuple, torch.Tensor], tuple[tuple, torch.Tensor]]
    output: Callable[[Any], torch.Tensor] = lambda out: out


def benchmark_arguments(description: str, default_json: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--policy", default="sige", choices=["sige", "exact"], help="sigec.compile policy")
    p.add_argument("--fractions", default="0.012,0.05,0.15,0.30",
                   help="comma-separated edit areas as fractions of the image (an all-false mask is always added)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    p.add_argument("--no-timing", action="store_true", help="skip the wall-clock measurements")
    p.add_argument("--quick", action="store_true", help="a small configuration, one edit, one repeat (for tests)")
    p.add_argument("--json", default=default_json, help="where to write the results")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the model runs (cuda: timings synchronize the GPU)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="the model's and inputs' dtype")
    p.add_argument("--runner", default="eager", choices=list(cuda_graphs.RUNNERS),
                   help="how the incremental graph runs (sigec.core.cuda_graphs.set_runner); the dense model stays eager")
    p.add_argument("--profile", action="store_true",
                   help="print where one incremental call of the first edit spends its time (torch.profiler, by op)")
    return p


def check_device(args: argparse.Namespace) -> None:
    """A clear error for a device or runner this machine cannot run."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: torch sees no CUDA device (torch {torch.__version__}, "
                         f"{'a CUDA build' if torch.version.cuda else 'a CPU-only build'}); run on a machine with "
                         "an NVIDIA GPU and a CUDA build of torch, or use --device cpu")
    if args.runner.endswith("cuda-graphs") and args.device != "cuda":
        raise SystemExit(f"--runner {args.runner} replays CUDA graphs: add --device cuda")


def _to_device(values: tuple, device: str, dtype: torch.dtype) -> tuple:
    """Floating tensors to ``dtype`` and every tensor to ``device`` (edits are made on the CPU)."""
    return tuple(v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                 if isinstance(v, torch.Tensor) else v for v in values)


def _synchronized(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    """``fn`` followed by a device synchronization, so wall-clock time covers the queued work."""
    if device != "cuda":
        return fn
    return lambda: (fn(), torch.cuda.synchronize())[0]


def parse_fractions(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[float]:
    try:
        fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    except ValueError:
        parser.error(f"--fractions must be comma-separated numbers, got {args.fractions!r}")
    if not fractions:
        parser.error("--fractions is empty")
    return fractions


def time_interleaved(dense: Callable, incremental: Callable, repeats: int) -> tuple[tuple, tuple]:
    """``(median, min, max)`` seconds of each function, timed alternately.

    This machine's speed drifts over seconds (shared cores), so the two are timed turn by turn:
    each speed-up compares calls made under the same conditions. The engine is never committed,
    so every incremental call edits the same recorded baseline.
    """
    samples: tuple[list, list] = ([], [])
    with torch.no_grad():
        dense(), incremental()  # warm-up
        for _ in range(repeats):
            for fn, out in zip((dense, incremental), samples):
                out.append(time_call(fn, 1, warmup=0)[0])
    return tuple((statistics.median(s), min(s), max(s)) for s in samples)


def active_blocks_total(engine, mask: torch.Tensor) -> int:
    """Active blocks summed over every (mask, grid) index set the incremental graph gathers with."""
    blocks = engine.mask_stats(mask)["blocks"]
    return int(sum(blocks[key].shape[0] for key in engine.signature.blocks))


def measure_edit(engine, case: EditCase, fraction: float, timing: bool, repeats: int,
                 device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """MACs, cache memory, quality and (optionally) timings of one elliptical edit.

    ``case.inputs`` are CPU fp32 (the edit is made there); the model runs on ``device`` in ``dtype``.
    """
    h, w = engine.context.input_resolution
    if fraction > 0:
        edited, mask = case.edit(case.inputs, ellipse_mask(h, w, fraction))
    else:
        edited, mask = case.inputs, torch.zeros(h, w, dtype=torch.bool)
    edited = _to_device(edited, device, dtype)
    report = engine.report(mask=mask)
    with torch.no_grad():
        y_incr = case.output(engine(*edited))
        y_dense = case.output(case.model(*edited))
    row = {
        "fraction": fraction,
        "achieved_fraction": float(mask.float().mean()),
        "active_blocks": active_blocks_total(engine, mask) if mask.any() else 0,
        "dense_macs": report.dense_macs,
        "incremental_macs": report.incremental_macs if mask.any() else 0,
        "cache_bytes": engine.store.nbytes(),
        "psnr_db": psnr(y_incr, y_dense),
        "max_abs_err": float((y_incr - y_dense).abs().max()),
    }
    row["mac_ratio"] = row["dense_macs"] / row["incremental_macs"] if row["incremental_macs"] else None
    if timing:
        dense_t, incr_t = time_interleaved(_synchronized(lambda: case.model(*edited), device),
                                           _synchronized(lambda: engine(*edited), device), repeats)
        row.update(dense_s=list(dense_t), incremental_s=list(incr_t), speedup=dense_t[0] / incr_t[0],
                   dense_fraction_of_time=incr_t[0] / dense_t[0])
    return row


def profile_table(engine, case: EditCase, fraction: float, device: str = "cpu",
                  dtype: torch.dtype = torch.float32, rows: int = 15) -> str:
    """``torch.profiler``'s table by op (self CPU time) of one incremental call of an edit."""
    h, w = engine.context.input_resolution
    edited, _ = case.edit(case.inputs, ellipse_mask(h, w, fraction))
    edited = _to_device(edited, device, dtype)
    with torch.no_grad():
        engine(*edited)  # warm-up, and the blocks this edit writes are saved
        with torch.profiler.profile() as prof:
            engine(*edited)
    return (f"profile of one incremental call, {fraction:.1%} edit:\n"
            + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def _ms(t: Optional[list]) -> str:
    return f"{t[0] * 1e3:.0f} [{t[1] * 1e3:.0f},{t[2] * 1e3:.0f}]" if t else "-"


def format_table(rows: list[dict]) -> str:
    head = (f"{'frac req':>8} {'frac got':>8} {'blocks':>7} {'dense GMAC':>10} {'incr GMAC':>9} "
            f"{'MAC ratio':>9} {'cache MiB':>9} {'PSNR dB':>8} {'dense ms [min,max]':>20} "
            f"{'incr ms [min,max]':>20} {'speedup':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = f"{r['mac_ratio']:.2f}x" if r["mac_ratio"] else "-"
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        lines.append(f"{r['fraction']:>8.3f} {r['achieved_fraction']:>8.4f} {r['active_blocks']:>7d} "
                     f"{r['dense_macs'] / 1e9:>10.2f} {r['incremental_macs'] / 1e9:>9.2f} {ratio:>9} "
                     f"{r['cache_bytes'] / 2**20:>9.1f} {r['psnr_db']:>8.2f} "
                     f"{_ms(r.get('dense_s')):>20} {_ms(r.get('incremental_s')):>20} {speed:>7}")
    return "\n".join(lines)


def run_edit_benchmark(case: EditCase, args: argparse.Namespace, fractions: list[float]) -> dict:
    """Compile, record, then measure every edit size (and the all-false mask); print and save."""
    import sigec

    device, dtype = getattr(args, "device", "cpu"), DTYPES[getattr(args, "dtype", "fp32")]
    runner = getattr(args, "runner", "eager")
    check_device(args)
    torch.set_num_threads(args.threads)
    case.model.to(device=device, dtype=dtype)
    inputs = _to_device(case.inputs, device, dtype)
    start = time.perf_counter()
    engine = sigec.compile(case.model, inputs, policy=args.policy)
    compile_s = time.perf_counter() - start
    h, w = engine.context.input_resolution
    where = f"{device} {args.dtype}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else "")
    print(f"{case.name} ({h}x{w}), policy {args.policy}, {where}, runner {runner}, {args.threads} thread(s): "
          f"compile {compile_s:.2f} s", flush=True)
    start = time.perf_counter()
    with torch.no_grad():
        engine(*inputs)  # the recording run every edit below is compared against
    record_s = time.perf_counter() - start
    print(f"record run {record_s:.2f} s", flush=True)
    costs = engine.context.kernel_costs
    print(f"kernel costs: {costs.summary()}", flush=True)
    cuda_graphs.set_runner(engine, runner)
    rows = [measure_edit(engine, case, f, not args.no_timing, args.repeats, device, dtype)
            for f in tqdm([*fractions, 0.0], desc="edit sizes", unit="mask")]
    print(format_table(rows))
    if getattr(args, "profile", False):
        print(profile_table(engine, case, fractions[0], device, dtype))
    result = {"model": case.name, "resolution": [h, w], "policy": args.policy, "threads": args.threads,
              "device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else None,
              "dtype": args.dtype, "runner": runner,
              "repeats": None if args.no_timing else args.repeats, "torch": torch.__version__,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "compile_s": compile_s,
              "record_s": record_s, "kernel_costs": dataclasses.asdict(costs), "rows": rows}
    path = write_json(args.json, result)
    print(f"wrote {path}")
    return result
