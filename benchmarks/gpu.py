"""Benchmark: everything issue 20 measures on one GPU, in one run that fits a short device lease.

Sections, run in this order while ``--budget-s`` lasts (a section that would not fit is listed as
skipped, never half-measured):

1. ``church`` - DDPM church-256 UNet, fp16, one step: dense eager against the incremental engine
   run eagerly and replayed as CUDA graphs (``--runner cuda-graphs``), at 1.2% and 5% edits.
2. ``sd`` - Stable Diffusion 1.x UNet, fp16, 64x64 latent, batch 1, one step at 1.7%, 5% and 15%
   edits: dense eager, dense ``torch.compile`` (``--compile-mode``, default ``reduce-overhead``;
   ``max-autotune-no-cudagraphs`` autotunes for minutes), incremental eager and CUDA graphs.
3. ``loop`` - the whole SDEdit loop at 512x512 (VAE encoder, ``--loop-steps`` DDIM steps at
   strength 0.8, VAE decoder; ``sigec.diffusion.DiffusionEditor``), incremental against dense eager.
4. ``sd-cfg`` - section 2 at batch 2 (classifier-free guidance).

Every row also gives the kernel launches of one incremental call read from the graph
(``sigec.core.launches``) and, on a GPU, the kernels ``torch.profiler`` saw in one eager
incremental call and one CUDA graph capture's time and memory. Timings synchronize the device and
are medians of ``--repeats`` calls timed in turn (min and max in the JSON). Weights are seeded
random (``sigec.models``): the figures are speed and agreement with dense, not picture quality.

    python benchmarks/gpu.py                      # on a CUDA machine: all sections, out/gpu.json
    python benchmarks/gpu.py --sections sd-cfg --budget-s 300   # what a first run had to skip
    python benchmarks/gpu.py --launches-only      # any machine: the launch counts alone (no timing)
    python benchmarks/gpu.py --launches-only --launch-costs all-sparse   # every layer that can be, sparse
    python benchmarks/gpu.py --smoke              # any machine, seconds: tiny models on the CPU,
                                                  # the same code paths (CUDA graphs replayed on the host)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see church256.py)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script or with -m

import sigec  # noqa: E402
from benchmarks.common import ellipse_mask, psnr, write_json  # noqa: E402
from sigec.core import cuda_graphs  # noqa: E402
from sigec.core.launches import count_launches, launching_ops  # noqa: E402
from sigec.ir.costs import KernelCosts  # noqa: E402
from sigec.models import SD_UNET_CONFIGS, UNET_CONFIGS, ddpm_unet, sd_unet  # noqa: E402

#: in order of priority: the acceptance figures first (church, SD batch 1, the loop), then SD batch 2
SECTIONS = ("church", "sd", "loop", "sd-cfg")
TIMESTEP = 500


@dataclasses.dataclass(frozen=True)
class Setup:
    """Sizes and places: the real run on a GPU, or ``--smoke``'s tiny one on the CPU."""

    device: str
    dtype: torch.dtype
    church: str
    church_fractions: tuple
    sd: str
    sd_fractions: tuple
    sd_batches: tuple
    loop_steps: int
    loop_fraction: float
    repeats: int
    compile_backend: str
    #: seconds each section is expected to need on an H100 (skipped when fewer are left)
    estimates: dict


def gpu_setup(args: argparse.Namespace) -> Setup:
    return Setup("cuda", torch.float16, "church256", (0.012, 0.05), "sd1", (0.017, 0.05, 0.15), (1, 2),
                 args.loop_steps, 0.017, args.repeats, "inductor",
                 {"church": 60, "sd": 120, "sd_compiled": 120, "loop": 120})


def smoke_setup(args: argparse.Namespace) -> Setup:
    return Setup("cpu", torch.float32, "church-small", (0.05,), "sd-tiny", (0.05,), (1, 2), 2, 0.05, 1, "eager",
                 {"church": 0, "sd": 0, "sd_compiled": 0, "loop": 0})


class Budget:
    """Wall-clock seconds left for the whole run."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def allows(self, need: float) -> bool:
        return self.left() >= need


class HostReplay:
    """``--smoke`` only: stands in for CUDA graph capture on the CPU (a replay reruns the graph
    eagerly into the captured outputs), so the runner's capture and replay bookkeeping runs."""

    def capture(self, fn: Callable, static_args: list) -> tuple[Callable[[], None], Any]:
        outputs = list(fn(*static_args))

        def replay() -> None:
            for out, result in zip(outputs, fn(*static_args)):
                if isinstance(out, torch.Tensor) and out.data_ptr() != result.data_ptr():
                    out.copy_(result)

        return replay, outputs


# ---------------------------------------------------------------------------------------------
# timing


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_in_turn(fns: dict[str, Callable[[], Any]], repeats: int, device: str) -> dict[str, list[float]]:
    """``{name: [median, min, max]}`` seconds, the functions timed in turn after one warm-up each
    (the machine's speed may drift; each comparison is between calls made side by side)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        _sync(device)
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                _sync(device)
                samples[name].append(time.perf_counter() - start)
    return {name: [statistics.median(s), min(s), max(s)] for name, s in samples.items()}


def profiled_kernels(fn: Callable[[], Any], device: str) -> Optional[int]:
    """Kernels (and memory copies/sets) one call of ``fn`` puts on the GPU; ``None`` on the CPU."""
    if device != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        try:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
        except RuntimeError as exc:  # no CUPTI, or another profiler running: the timings still stand
            print(f"torch.profiler failed ({exc}); kernels not counted", flush=True)
            return None
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


# ---------------------------------------------------------------------------------------------
# one model step: dense, compiled, incremental eager and replayed


def _edit_latent(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The benchmarks' edit: N(0, 0.3^2) noise added inside the mask (seeded; CPU, then moved)."""
    noise = 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    return torch.where(mask, x + noise, x)


def _move(values: tuple, setup: Setup) -> tuple:
    return tuple(v.to(device=setup.device, dtype=setup.dtype if v.is_floating_point() else v.dtype)
                 if isinstance(v, torch.Tensor) else v for v in values)


def _graph_arguments(engine, plan, edited: tuple) -> tuple:
    """The arguments one engine call on ``edited`` passes to ``plan``'s incremental graph."""
    calls = []
    graph = plan.incremental
    plan.incremental = lambda *args: calls.append(args) or graph(*args)
    try:
        with torch.no_grad():
            engine(*edited)
    finally:
        plan.incremental = graph
    return calls[0]


def measure_step(name: str, model: torch.nn.Module, inputs: tuple, fractions: tuple, setup: Setup,
                 compiled: Optional[Callable] = None, batch: int = 1) -> tuple[list[dict], dict]:
    """Compile ``model`` with sigec (one plan per fraction), record, then time every variant per
    edit size. ``inputs`` are CPU fp32, spatial input first; ``compiled`` is dense torch.compile."""
    model = model.to(device=setup.device, dtype=setup.dtype)
    moved = _move(inputs, setup)
    start = time.perf_counter()
    engine = sigec.compile(model, moved, expected_active_fraction=fractions)
    compile_s = time.perf_counter() - start
    with torch.no_grad():
        engine(*moved)
    info = {"case": name, "batch": batch, "sigec_compile_s": compile_s, "cache_bytes": engine.store.nbytes()}
    h, w = engine.context.input_resolution
    rows = []
    for fraction in fractions:
        mask = ellipse_mask(h, w, fraction)
        edited = _move((_edit_latent(inputs[0], mask), *inputs[1:]), setup)
        plan = engine.plan_for(mask)
        launches = count_launches(plan)
        fns = {"dense": lambda: model(*edited), "eager": lambda: engine(*edited)}
        if compiled is not None:
            fns["compiled"] = lambda: compiled(*edited)
        times = time_in_turn(fns, setup.repeats, setup.device)
        kernels = profiled_kernels(lambda: engine(*edited), setup.device)
        graph_args = _graph_arguments(engine, plan, edited)
        graph_kernels = profiled_kernels(lambda: plan.incremental(*graph_args), setup.device)
        with torch.no_grad():  # the whole call: mask evaluation, block indices, saved blocks, the graph
            call_ops = sum(launching_ops(lambda: engine(*edited)).values())
        cuda_graphs.set_runner(engine, "cuda-graphs", recorder=HostReplay() if setup.device == "cpu" else None)
        times.update(time_in_turn({"graphs": lambda: engine(*edited)}, setup.repeats, setup.device))
        with torch.no_grad():
            y_incr, y_dense = engine(*edited).sample, model(*edited).sample
        records = engine.report(mask).captures.get(plan.planned_fraction, [])
        cuda_graphs.set_runner(engine, "eager")
        rows.append({
            **info, "fraction": fraction, "achieved_fraction": float(mask.float().mean()),
            "plan": plan.planned_fraction, "launches": launches.launches, "launch_ops": launches.ops,
            "launch_nodes": launches.nodes,
            "launches_by_kind": launches.by_kind, "call_ops": call_ops, "profiled_kernels": kernels,
            "profiled_graph_kernels": graph_kernels,
            **{f"{k}_s": v for k, v in times.items()},
            "capture_s": records[-1].capture_s if records else None,
            "capture_bytes": records[-1].memory_bytes if records else None,
            "psnr_db": psnr(y_incr.float(), y_dense.float()),
        })
    return rows, info


def church_rows(setup: Setup) -> list[dict]:
    res = UNET_CONFIGS[setup.church]["sample_size"]
    x = torch.randn((1, 3, res, res), generator=torch.Generator().manual_seed(0))
    rows, _ = measure_step(setup.church, ddpm_unet(setup.church), (x, torch.tensor([TIMESTEP])),
                           setup.church_fractions, setup)
    return rows


def sd_inputs(config: str, batch: int) -> tuple:
    res, dim = SD_UNET_CONFIGS[config]["sample_size"], SD_UNET_CONFIGS[config]["cross_attention_dim"]
    x = torch.randn((1, 4, res, res), generator=torch.Generator().manual_seed(0)).repeat(batch, 1, 1, 1)
    emb = torch.randn((batch, 77, dim), generator=torch.Generator().manual_seed(0))
    return x, torch.tensor([TIMESTEP] * batch), emb


def sd_rows(setup: Setup, budget: Budget, compile_mode: str, skipped: list, batches: tuple) -> list[dict]:
    rows = []
    for batch in batches:
        if not budget.allows(setup.estimates["sd"]):
            skipped.append(f"sd batch {batch}: {budget.left():.0f} s left")
            continue
        model = sd_unet(setup.sd).to(device=setup.device, dtype=setup.dtype)
        compiled, compiled_s = None, None
        if budget.allows(setup.estimates["sd"] + setup.estimates["sd_compiled"]):
            torch._dynamo.reset()
            options = {"backend": setup.compile_backend}
            if setup.compile_backend == "inductor":
                options["mode"] = compile_mode
            compiled = torch.compile(model, **options)
            start = time.perf_counter()
            with torch.no_grad():
                compiled(*_move(sd_inputs(setup.sd, batch), setup))
            _sync(setup.device)
            compiled_s = time.perf_counter() - start
        else:
            skipped.append(f"sd batch {batch} torch.compile: {budget.left():.0f} s left")
        batch_rows, _ = measure_step(setup.sd, model, sd_inputs(setup.sd, batch), setup.sd_fractions, setup,
                                     compiled=compiled, batch=batch)
        for row in batch_rows:
            row["torch_compile_s"] = compiled_s
        rows += batch_rows
    return rows


def loop_row(setup: Setup) -> dict:
    """The whole SDEdit loop: record, then the edited run incrementally and densely."""
    from benchmarks.sd_unet import synthetic_picture, text_embedding
    from sigec.diffusion import DiffusionEditor, sd_vae

    unet = sd_unet(setup.sd).to(device=setup.device, dtype=setup.dtype)
    vae = sd_vae(setup.sd).to(device=setup.device, dtype=setup.dtype)
    editor = DiffusionEditor(unet, text_embedding(setup.sd), vae=vae, steps=setup.loop_steps, strength=0.8,
                             progress=False)
    size = 8 * SD_UNET_CONFIGS[setup.sd]["sample_size"]
    image, edited, mask = synthetic_picture(size, setup.loop_fraction)
    start = time.perf_counter()
    editor._compile_engines(editor._check_image(image))  # as benchmarks/sd_unet.py: compiling is not recording
    compile_s = time.perf_counter() - start
    _sync(setup.device)
    start = time.perf_counter()
    with torch.no_grad():
        original = editor.record(image)
    _sync(setup.device)
    record_s = time.perf_counter() - start

    def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
        _sync(setup.device)
        begin = time.perf_counter()
        with torch.no_grad():
            out = fn()
        _sync(setup.device)
        return out, time.perf_counter() - begin

    _, dense_original_s = timed(lambda: editor.run_dense(image))
    result, incremental_s = timed(lambda: editor.edit(edited, mask))
    (dense_image, _, _), dense_s = timed(lambda: editor.run_dense(edited))
    # CUDA graphs: a capture per (step slot, plan, block counts), so a runner holds one per step;
    # the first edit captures, the same edit again replays every step
    for engine in editor.engines.values():
        cuda_graphs.set_runner(engine, "cuda-graphs", max_graphs=len(editor.steps) + 1,
                               recorder=HostReplay() if setup.device == "cpu" else None)
    _, first_graphs_s = timed(lambda: editor.edit(edited, mask))
    replayed, graphs_s = timed(lambda: editor.edit(edited, mask))
    records = [r for engine in editor.engines.values() for p in engine.plans
               for r in p.incremental.capture_records()]
    for engine in editor.engines.values():
        cuda_graphs.set_runner(engine, "eager")
    return {"case": f"{setup.sd} SDEdit loop {size}x{size}", "batch": 1, "fraction": setup.loop_fraction,
            "achieved_fraction": float(mask.float().mean()), "steps": len(editor.steps), "sigec_compile_s": compile_s,
            "record_s": record_s,
            "dense_original_s": dense_original_s, "loop_incremental_s": incremental_s, "loop_dense_s": dense_s,
            "speedup": dense_s / incremental_s, "psnr_db": psnr(result.image.float(), dense_image.float()),
            "loop_graphs_first_s": first_graphs_s, "loop_graphs_s": graphs_s, "speedup_graphs": dense_s / graphs_s,
            "graphs_vs_eager_psnr_db": psnr(replayed.image.float(), result.image.float()), "captures": len(records),
            "capture_s": sum(r.capture_s for r in records), "capture_bytes": sum(r.memory_bytes for r in records),
            # the same for recomputing nothing (the original's result): what the edit's PSNR compares with
            "psnr_no_recompute_db": psnr(original.float(), dense_image.float()),
            "cache_bytes": sum(result.cache_bytes.values())}


# ---------------------------------------------------------------------------------------------
# launch counts alone, and output


#: ``--launch-costs all-sparse``: costs proportional to work with free op calls, so the planner makes
#: every layer sparse that can be (the planner of the first H100 measurements, before kernel costs
#: were measured on the GPU)
ALL_SPARSE_COSTS = KernelCosts(dense_mac=1e-12, dense_weight_byte=1e-18, sparse_mac=1e-12, sparse_weight_byte=1e-18,
                               element=4e-12, call=1e-18, source="all sparse: proportional to work, free op calls")


def launch_counts(setup: Setup, sections: list[str], costs: Optional[KernelCosts] = None) -> list[dict]:
    """The graph's launches per incremental call for the church and SD plans (no timing, no GPU),
    planned with ``costs`` (default: this machine's measured kernel costs)."""
    rows = []
    cases = []
    if "church" in sections:
        res = UNET_CONFIGS[setup.church]["sample_size"]
        cases.append((setup.church, ddpm_unet(setup.church), (torch.zeros(1, 3, res, res), torch.tensor([TIMESTEP])),
                      setup.church_fractions))
    if "sd" in sections:
        cases += [(f"{setup.sd} batch {b}", sd_unet(setup.sd), sd_inputs(setup.sd, b), setup.sd_fractions)
                  for b in setup.sd_batches]
    for name, model, inputs, fractions in cases:
        engine = sigec.compile(model.eval(), inputs, expected_active_fraction=fractions, kernel_costs=costs)
        with torch.no_grad():
            engine(*inputs)
        h, w = engine.context.input_resolution
        for fraction in fractions:
            mask = ellipse_mask(h, w, fraction)
            edited = (_edit_latent(inputs[0], mask), *inputs[1:])
            plan = engine.plan_for(mask)
            count = count_launches(plan)
            with torch.no_grad():
                engine(*edited)  # the blocks this edit writes are saved: the next call is a repeat
                call_ops = sum(launching_ops(lambda: engine(*edited)).values())
            rows.append({"case": name, "fraction": fraction, "plan": plan.planned_fraction,
                         "launches": count.launches, "launch_ops": count.ops, "launch_nodes": count.nodes,
                         "launches_by_kind": count.by_kind, "call_ops": call_ops})
    return rows


def _ms(row: dict, key: str) -> str:
    value = row.get(key)
    return f"{value[0] * 1e3:.2f}" if value else "-"


def _ratio(row: dict, over: str, under: str) -> str:
    a, b = row.get(over), row.get(under)
    return f"{a[0] / b[0]:.2f}x" if a and b else "-"


def format_table(rows: list[dict]) -> str:
    head = (f"{'case':28s} {'b':>1s} {'frac':>6s} {'dense ms':>9s} {'compiled':>9s} {'incr ms':>8s} {'graphs':>8s} "
            f"{'eager/dense':>11s} {'graphs/dense':>12s} {'graphs/compiled':>15s} {'launches':>8s} {'call ops':>8s} "
            f"{'kernels':>13s} "
            f"{'PSNR':>6s}")
    lines = [head, "-" * len(head)]
    legend = ("launches: CUDA kernels of one incremental graph call read from the graph (sigec.core.launches); "
              "call ops: launching ops of one whole engine call, dispatched; kernels: profiled on the GPU, "
              "graph alone / whole call")
    for r in rows:
        if "loop_dense_s" in r:
            lines.append(f"{r['case'][:28]:28s} {r['batch']:>1d} {r['achieved_fraction']:>6.1%} "
                         f"{r['loop_dense_s'] * 1e3:>9.0f} {'-':>9s} {r['loop_incremental_s'] * 1e3:>8.0f} "
                         f"{r['loop_graphs_s'] * 1e3:>8.0f} {r['speedup']:>10.2f}x {r['speedup_graphs']:>11.2f}x "
                         f"{'-':>15s} {'-':>8s} {'-':>8s} {'-':>13s} {r['psnr_db']:>6.1f}")
            continue
        kernels = (f"{r['profiled_graph_kernels']}/{r['profiled_kernels']}"
                   if r.get("profiled_kernels") is not None else "-")
        lines.append(f"{r['case'][:28]:28s} {r['batch']:>1d} {r['achieved_fraction']:>6.1%} {_ms(r, 'dense_s'):>9s} "
                     f"{_ms(r, 'compiled_s'):>9s} {_ms(r, 'eager_s'):>8s} {_ms(r, 'graphs_s'):>8s} "
                     f"{_ratio(r, 'dense_s', 'eager_s'):>11s} {_ratio(r, 'dense_s', 'graphs_s'):>12s} "
                     f"{_ratio(r, 'compiled_s', 'graphs_s'):>15s} {r['launches']:>8d} {r['call_ops']:>8d} {kernels:>13s} "
                     f"{r['psnr_db']:>6.1f}")
    return "\n".join([*lines, legend])


def format_launches(rows: list[dict]) -> str:
    lines = [f"{'case':20s} {'edit':>6s} {'launches':>8s} {'ops':>5s} {'nodes':>6s} {'call ops':>8s}  launches by kind"]
    for r in rows:
        kinds = ", ".join(f"{k} {v}" for k, v in r["launches_by_kind"].items())
        lines.append(f"{r['case'][:20]:20s} {r['fraction']:>6.1%} {r['launches']:>8d} {r['launch_ops']:>5d} "
                     f"{r['launch_nodes']:>6d} {r['call_ops']:>8d}  {kinds}")
    lines.append("launches: CUDA kernels of one call of the edit's incremental graph, read from the graph; ops: the "
                 "launching operators it dispatches; nodes: graph nodes that launch; call ops: launching operators "
                 "one whole engine call dispatches (a repeated edit: masks, block indices and the graph)")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {SECTIONS}")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="wall-clock seconds for the whole run; sections that would not fit are skipped")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per variant (GPU)")
    p.add_argument("--loop-steps", type=int, default=50, help="DDIM steps of the SDEdit loop's schedule (0.8 run)")
    p.add_argument("--compile-mode", default="reduce-overhead",
                   choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"],
                   help="torch.compile mode of the dense SD baseline")
    p.add_argument("--json", default="out/gpu.json", help="where to write the results")
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU, the same code paths, seconds")
    p.add_argument("--launches-only", action="store_true",
                   help="only the launch counts read from the graphs, at the real sizes (any machine; no timing)")
    p.add_argument("--launch-costs", default="machine", choices=["machine", "all-sparse"],
                   help="--launches-only: plan with this machine's kernel costs, or make every layer sparse")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if args.repeats < 1 or args.loop_steps < 1 or args.budget_s <= 0:
        p.error("--repeats and --loop-steps must be at least 1, --budget-s positive")
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    if args.launches_only:
        setup = gpu_setup(args) if not args.smoke else smoke_setup(args)
        costs = ALL_SPARSE_COSTS if args.launch_costs == "all-sparse" else None
        rows = launch_counts(dataclasses.replace(setup, device="cpu", dtype=torch.float32), args.sections, costs)
        print(format_launches(rows))
        result = {"launches": rows, "launch_costs": args.launch_costs, "torch": torch.__version__}
        print(f"wrote {write_json(args.json, result)}")
        return result
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit(f"benchmarks/gpu.py measures on a CUDA GPU, and torch sees none (torch {torch.__version__}, "
                         f"{'a CUDA build' if torch.version.cuda else 'a CPU-only build'}). Run it on a machine with an "
                         "NVIDIA GPU, or use --smoke (tiny models on the CPU) or --launches-only (counts, no timing)")
    setup = smoke_setup(args) if args.smoke else gpu_setup(args)
    budget = Budget(args.budget_s)
    torch.manual_seed(0)
    if setup.device == "cuda":
        from sigec.runtime import native

        native.load_cuda()
        where = f"{torch.cuda.get_device_name()}, {native.cuda_status()}"
    else:
        where = "cpu (smoke)"
    print(f"benchmarks/gpu.py on {where}, torch {torch.__version__}, budget {args.budget_s:.0f} s", flush=True)
    rows: list[dict] = []
    skipped: list[str] = []
    section_s: dict[str, float] = {}
    errors: dict[str, str] = {}
    for section in args.sections:
        start = time.perf_counter()
        try:
            if section in ("sd", "sd-cfg"):
                batches = tuple(b for b in setup.sd_batches if (b == 1) == (section == "sd"))
                rows += sd_rows(setup, budget, args.compile_mode, skipped, batches)
            elif not budget.allows(setup.estimates[section]):
                skipped.append(f"{section}: {budget.left():.0f} s left")
            else:
                rows += church_rows(setup) if section == "church" else [loop_row(setup)]
        except Exception as exc:  # one lease, one run: keep the other sections' figures
            if args.smoke:
                raise
            errors[section] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        section_s[section] = time.perf_counter() - start
        print(f"{section}: {section_s[section]:.0f} s", flush=True)
    print(format_table(rows))
    if skipped:
        print("skipped (budget): " + "; ".join(skipped))
    for section, error in errors.items():
        print(f"failed: {section}: {error}")
    elapsed = args.budget_s - budget.left()
    print(f"total {elapsed:.0f} s")
    result = {"device": setup.device, "device_name": torch.cuda.get_device_name() if setup.device == "cuda" else None,
              "dtype": str(setup.dtype), "torch": torch.__version__, "smoke": args.smoke,
              "compile_mode": args.compile_mode, "repeats": setup.repeats, "budget_s": args.budget_s,
              "elapsed_s": elapsed, "section_s": section_s, "skipped": skipped, "errors": errors, "rows": rows}
    print(f"wrote {write_json(args.json, result)}")
    if errors:
        raise SystemExit(f"{len(errors)} section(s) failed: {', '.join(errors)} (the others are in {args.json})")
    return result


if __name__ == "__main__":
    main()
