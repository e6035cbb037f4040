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


def brush_mask(h: int, w: int, fraction: float) -> torch.Tensor:
    """A brush stroke (a wavy line, ``sigec.frontends.edits.wavy_stroke``) covering ``fraction``
    of the image: thin and long, so it touches many more blocks than an ellipse of its area."""
    points, radius = edits.wavy_stroke(h, w, fraction, centre=(0.55, 0.35))
    return edits.brush_stroke_mask(points, radius, h, w)


#: edit shapes by name (``--shapes``): ``(h, w, fraction) -> H x W bool mask``
SHAPES: dict[str, Callable[[int, int, float], torch.Tensor]] = {"ellipse": ellipse_mask, "brush": brush_mask}


def edit_mask(shape: str, h: int, w: int, fraction: float) -> torch.Tensor:
    """The mask of edit shape ``shape`` (a key of ``SHAPES``) covering ``fraction`` of h x w."""
    return SHAPES[shape](h, w, fraction)


def decoy_mask(mask: torch.Tensor) -> torch.Tensor:
    """Another mask of the same size and shape (``mask`` turned by 180 degrees): editing it just
    before ``mask`` makes the next call a first call of a new mask."""
    return mask.flip(-1).flip(-2)


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
    p.add_argument("--shapes", default="ellipse",
                   help=f"comma-separated edit shapes, each measured at every fraction ({', '.join(SHAPES)})")
    p.add_argument("--profile", action="store_true",
                   help="print where one incremental call of each edit spends its time (torch.profiler, by op)")
    p.add_argument("--block-size", type=block_sizes, default=None, metavar="RES:EDGE,...",
                   help="sigec.compile block_size per resolution, e.g. 64:2,32:1 (others keep the default rule)")
    return p


def block_sizes(text: str) -> dict[int, int]:
    """``"64:2,32:1"`` => ``{64: 2, 32: 1}``: block edges by resolution (height), for ``--block-size``."""
    try:
        sizes = {int(res): int(edge) for res, edge in (item.split(":") for item in text.split(",") if item.strip())}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RESOLUTION:EDGE pairs like 64:2,32:1, got {text!r}") from None
    if not sizes or min(sizes.values()) < 1:
        raise argparse.ArgumentTypeError(f"expected positive block edges like 64:2,32:1, got {text!r}")
    return sizes


def parse_shapes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or not shapes:
        parser.error(f"--shapes must name some of {', '.join(SHAPES)}, got {args.shapes!r}")
    return shapes


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


def time_first_and_repeated(dense: Callable, decoy: Callable, incremental: Callable,
                            repeats: int) -> tuple[tuple, tuple, tuple]:
    """``(median, min, max)`` seconds of a dense call, of the first incremental call of a mask and
    of a repeated call of it, timed turn by turn.

    Each round runs ``dense()``, then ``decoy()`` (an edit of another mask, untimed), so that the
    next ``incremental()`` meets a new mask: it restores the blocks the decoy dirtied and saves
    the baselines of its own before it computes (the first call of a stroke). The second
    ``incremental()`` repeats the same mask, as an interactive stroke being refined does.
    """
    samples: tuple[list, list, list] = ([], [], [])
    with torch.no_grad():
        dense(), decoy(), incremental()  # warm-up
        for _ in range(repeats):
            samples[0].append(time_call(dense, 1, warmup=0)[0])
            decoy()
            samples[1].append(time_call(incremental, 1, warmup=0)[0])
            samples[2].append(time_call(incremental, 1, warmup=0)[0])
    return tuple((statistics.median(s), min(s), max(s)) for s in samples)


def efficiency(speedup: Optional[float], mac_ratio: Optional[float]) -> Optional[float]:
    """How much of the MAC cut the wall clock keeps: speed-up over MAC ratio (1 = all of it)."""
    return speedup / mac_ratio if speedup and mac_ratio else None


def active_blocks_total(engine, mask: torch.Tensor) -> int:
    """Active blocks summed over every (mask, grid) index set the incremental graph gathers with."""
    blocks = engine.mask_stats(mask)["blocks"]
    return int(sum(blocks[key].shape[0] for key in engine.signature.blocks))


def measure_edit(engine, case: EditCase, fraction: float, timing: bool, repeats: int,
                 device: str = "cpu", dtype: torch.dtype = torch.float32, shape: str = "ellipse") -> dict:
    """MACs, cache memory, quality and (optionally) timings of one edit of ``shape``.

    ``case.inputs`` are CPU fp32 (the edit is made there); the model runs on ``device`` in ``dtype``.
    Timings: dense, the first incremental call of the edit's mask and a repeated call
    (``time_first_and_repeated``); ``speedup`` is that of the repeated call.
    """
    h, w = engine.context.input_resolution
    if fraction > 0:
        edited, mask = case.edit(case.inputs, edit_mask(shape, h, w, fraction))
    else:
        edited, mask = case.inputs, torch.zeros(h, w, dtype=torch.bool)
    edited = _to_device(edited, device, dtype)
    report = engine.report(mask=mask)
    with torch.no_grad():
        y_incr = case.output(engine(*edited))
        y_dense = case.output(case.model(*edited))
    row = {
        "shape": shape if fraction > 0 else "none",
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
        decoy = (_to_device(case.edit(case.inputs, decoy_mask(mask))[0], device, dtype) if fraction > 0
                 else edited)
        dense_t, first_t, incr_t = time_first_and_repeated(_synchronized(lambda: case.model(*edited), device),
                                                           _synchronized(lambda: engine(*decoy), device),
                                                           _synchronized(lambda: engine(*edited), device), repeats)
        row.update(dense_s=list(dense_t), first_s=list(first_t), incremental_s=list(incr_t),
                   speedup=dense_t[0] / incr_t[0], first_speedup=dense_t[0] / first_t[0],
                   dense_fraction_of_time=incr_t[0] / dense_t[0])
        row.update(efficiency=efficiency(row["speedup"], row["mac_ratio"]),
                   first_efficiency=efficiency(row["first_speedup"], row["mac_ratio"]))
    return row


def profile_rows(events, rows: int = 15) -> list[dict]:
    """The ``rows`` ops with the most self CPU time in ``prof.key_averages()``: ``{"op", "ms",
    "calls", "share"}``, plus a last row ``"rest"`` with the others (share of the total self time)."""
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops) or 1.0
    out = [{"op": e.key, "ms": e.self_cpu_time_total / 1e3, "calls": e.count, "share": e.self_cpu_time_total / total}
           for e in ops[:rows]]
    rest = ops[rows:]
    if rest:
        t = sum(e.self_cpu_time_total for e in rest)
        out.append({"op": f"rest ({len(rest)} ops)", "ms": t / 1e3, "calls": sum(e.count for e in rest),
                    "share": t / total})
    return out


def profile_edit(engine, case: EditCase, fraction: float, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 shape: str = "ellipse", rows: int = 15) -> dict:
    """Where one (repeated) incremental call of an edit spends its time: ``torch.profiler``'s self
    CPU time by op, with the call's wall time under the profiler and its op-call count."""
    h, w = engine.context.input_resolution
    edited, _ = case.edit(case.inputs, edit_mask(shape, h, w, fraction))
    edited = _to_device(edited, device, dtype)
    with torch.no_grad():
        engine(*edited)  # warm-up, and the blocks this edit writes are saved
        start = time.perf_counter()
        with torch.profiler.profile() as prof:
            engine(*edited)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    return {"fraction": fraction, "shape": shape, "wall_ms": wall * 1e3,
            "op_calls": sum(e.count for e in events), "rows": profile_rows(events, rows)}


def format_profile(profile: dict) -> str:
    head = f"{'op':40s} {'self ms':>9s} {'calls':>6s} {'share':>6s}"
    lines = [f"profile of one incremental call, {profile['fraction']:.1%} edit ({profile['shape']}): "
             f"{profile['wall_ms']:.0f} ms under the profiler, {profile['op_calls']} op calls",
             head, "-" * len(head)]
    lines += [f"{r['op'][:40]:40s} {r['ms']:>9.1f} {r['calls']:>6d} {r['share']:>6.1%}" for r in profile["rows"]]
    return "\n".join(lines)


def profile_table(engine, case: EditCase, fraction: float, device: str = "cpu",
                  dtype: torch.dtype = torch.float32, rows: int = 15, shape: str = "ellipse") -> str:
    """The by-op profile of one incremental call of an edit, as a printed table."""
    return format_profile(profile_edit(engine, case, fraction, device, dtype, shape, rows))


def _ms(t: Optional[list]) -> str:
    return f"{t[0] * 1e3:.0f} [{t[1] * 1e3:.0f},{t[2] * 1e3:.0f}]" if t else "-"


def _x(v: Optional[float]) -> str:
    return f"{v:.2f}x" if v else "-"


def _eff(v: Optional[float]) -> str:
    return f"{v:.2f}" if v else "-"


def format_table(rows: list[dict]) -> str:
    """The edit table. ``speedup`` and ``effic.`` (speed-up / MAC ratio) are those of a repeated
    call of the edit's mask; ``1st`` columns those of its first call."""
    head = (f"{'shape':7} {'frac req':>8} {'frac got':>8} {'blocks':>7} {'dense GMAC':>10} {'incr GMAC':>9} "
            f"{'MAC ratio':>9} {'cache MiB':>9} {'PSNR dB':>8} {'dense ms [min,max]':>20} "
            f"{'1st call ms [min,max]':>21} {'incr ms [min,max]':>20} {'1st spdup':>9} {'speedup':>7} "
            f"{'1st eff.':>8} {'effic.':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.get('shape', 'ellipse'):7} {r['fraction']:>8.3f} {r['achieved_fraction']:>8.4f} "
                     f"{r['active_blocks']:>7d} {r['dense_macs'] / 1e9:>10.2f} {r['incremental_macs'] / 1e9:>9.2f} "
                     f"{_x(r['mac_ratio']):>9} {r['cache_bytes'] / 2**20:>9.1f} {r['psnr_db']:>8.2f} "
                     f"{_ms(r.get('dense_s')):>20} {_ms(r.get('first_s')):>21} {_ms(r.get('incremental_s')):>20} "
                     f"{_x(r.get('first_speedup')):>9} {_x(r.get('speedup')):>7} "
                     f"{_eff(r.get('first_efficiency')):>8} {_eff(r.get('efficiency')):>6}")
    lines.append("efficiency = speed-up / MAC ratio (1.00: the wall clock keeps the whole MAC cut)")
    return "\n".join(lines)


def run_edit_benchmark(case: EditCase, args: argparse.Namespace, fractions: list[float],
                       shapes: Optional[list[str]] = None) -> dict:
    """Compile, record, then measure every edit shape and size (and the all-false mask); print and save."""
    import sigec

    device, dtype = getattr(args, "device", "cpu"), DTYPES[getattr(args, "dtype", "fp32")]
    runner = getattr(args, "runner", "eager")
    check_device(args)
    torch.set_num_threads(args.threads)
    case.model.to(device=device, dtype=dtype)
    inputs = _to_device(case.inputs, device, dtype)
    start = time.perf_counter()
    engine = sigec.compile(case.model, inputs, policy=args.policy, block_size=getattr(args, "block_size", None))
    compile_s = time.perf_counter() - start
    h, w = engine.context.input_resolution
    where = f"{device} {args.dtype}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else "")
    print(f"{case.name} ({h}x{w}), policy {args.policy}, {where}, runner {runner}, {args.threads} thread(s), "
          f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'default')}: compile {compile_s:.2f} s", flush=True)
    start = time.perf_counter()
    with torch.no_grad():
        engine(*inputs)  # the recording run every edit below is compared against
    record_s = time.perf_counter() - start
    print(f"record run {record_s:.2f} s", flush=True)
    costs = engine.context.kernel_costs
    print(f"kernel costs: {costs.summary()}", flush=True)
    cuda_graphs.set_runner(engine, runner)
    shapes = shapes or ["ellipse"]
    cases = [(shape, f) for shape in shapes for f in fractions] + [("ellipse", 0.0)]
    rows = [measure_edit(engine, case, f, not args.no_timing, args.repeats, device, dtype, shape)
            for shape, f in tqdm(cases, desc="edit sizes", unit="mask")]
    print(format_table(rows))
    profiles = []
    if getattr(args, "profile", False):
        for shape, f in cases[:-1]:
            profiles.append(profile_edit(engine, case, f, device, dtype, shape))
            print(format_profile(profiles[-1]), flush=True)
    result = {"model": case.name, "resolution": [h, w], "policy": args.policy, "threads": args.threads,
              "device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else None,
              "dtype": args.dtype, "runner": runner,
              "repeats": None if args.no_timing else args.repeats, "torch": torch.__version__,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
              "block_size": getattr(args, "block_size", None), "compile_s": compile_s,
              "record_s": record_s, "kernel_costs": dataclasses.asdict(costs), "rows": rows,
              "profiles": profiles}
    path = write_json(args.json, result)
    print(f"wrote {path}")
    return result
