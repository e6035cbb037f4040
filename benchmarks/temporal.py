"""Benchmark: temporal reuse (DeepCache, FasterDiffusion) in a DDIM loop, against the dense loop
and the DeepCache package.

For each UNet it runs the same DDIM loop (same initial latent, same scheduler) densely, through
sigec engines with the DeepCache cut (N = 3 and 5, branch 0) and FasterDiffusion's cut and key
steps, and with ``DeepCache.DeepCacheSDHelper`` patching the model. The loops advance in
lockstep, one step of each in turn, so that the changing load of a shared machine falls on all of
them alike. It prints one table: loop time (the sum of the loop's step times, median [min, max]
over ``--repeats`` rounds), MACs per loop counted from the graphs, the MAC ratio and speed-up
over the dense loop (each round's ratio, as its loops shared one load; median [min, max]), their
quotient (how much of the MAC cut the wall clock keeps), and the final
latent's PSNR against the dense loop. The MACs of every graph are cross-checked with
``torch.utils.flop_counter.FlopCounterMode``. FasterDiffusion's key steps are defined for DDIM-50,
so ``--fd-steps 50`` times it (against its own dense loop) at that length.

Models: ``sd1`` (``sigec.models.sd_unet("sd1")``: 64x64 latent, text embeddings (1, 77, 768)
drawn at random) and ``church256`` (``sigec.models.ddpm_unet("church256")``), seeded random
weights. On the trained ``digits-ddpm`` model (when it ships) it adds fidelity: the final samples'
PSNR against the dense loop for each schedule, including ``"auto"`` at the MACs of uniform N=3.

    python benchmarks/temporal.py --fd-steps 50                     # sd1 and church256, 20 steps
    python benchmarks/temporal.py --models sd1 --steps 50 --repeats 1
    python benchmarks/temporal.py --quick --no-timing               # small configurations (tests)
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Callable, Optional

# Busy-waiting OpenMP threads make 2-thread timings on a shared machine jump; must be set before
# torch loads its OpenMP runtime. An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script or with -m

import sigec  # noqa: E402
from benchmarks.common import psnr, write_json  # noqa: E402
from sigec.models import ddpm_unet, sd_unet  # noqa: E402
from sigec.temporal import DeepCache, FasterDiffusion, Reuse  # noqa: E402

aten = torch.ops.aten


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """torch 2.13's FlopCounterMode has no formula for the CPU attention kernel: Q @ K^T and P @ V."""
    *batch, lq, dqk = query_shape
    return 2 * math.prod(batch) * lq * key_shape[-2] * (dqk + value_shape[-1])


_CPU_SDPA = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def counted_macs(fn: Callable[[], object]) -> int:
    """MACs of one call of ``fn`` according to FlopCounterMode (FLOPs / 2)."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_SDPA)
    with torch.no_grad(), counter:
        fn()
    return counter.get_total_flops() // 2


@dataclasses.dataclass
class Case:
    """A UNet, its example inputs and how the loop calls it (``call(model, latent, t)``)."""

    name: str
    model: torch.nn.Module
    latent: torch.Tensor
    kwargs: dict
    call: Callable


def sd_case(config: str) -> Case:
    model = sd_unet(config)
    res, dim = model.config.sample_size, model.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, res, res, generator=g)
    text = torch.randn(1, 77, dim, generator=g)
    return Case(config, model, latent, {"encoder_hidden_states": text},
                lambda m, x, t: m(x, t, encoder_hidden_states=text).sample)


def church_case(config: str) -> Case:
    model = ddpm_unet(config)
    res = model.config.sample_size
    latent = torch.randn(1, 3, res, res, generator=torch.Generator().manual_seed(0))
    return Case(config, model, latent, {}, lambda m, x, t: m(x, t).sample)


def ddim_loop(step: Callable, scheduler, latent: torch.Tensor, steps: int) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    x = latent.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(step(x, t), t, x).prev_sample
    return x


class Variant:
    """One way of running the loop's model call; ``begin``/``pause``/``resume``/``end`` bracket a
    trajectory and every step, so that variants sharing the model can take turns step by step."""

    def __init__(self, step: Callable, kind: Callable[[int], str] = lambda i: "full"):
        self.step = step
        self.kind = kind  # "full" or "partial": what step i (of the trajectory) ran

    def begin(self) -> None: ...

    def resume(self) -> None: ...

    def pause(self) -> None: ...

    def end(self) -> None: ...


class PackageVariant(Variant):
    """``DeepCache.DeepCacheSDHelper`` patching the model: its modules are wrapped only during this
    variant's own steps (its caches and step counter persist in between)."""

    def __init__(self, case: Case, scheduler, interval: int):
        from DeepCache import DeepCacheSDHelper

        super().__init__(lambda x, t: case.call(case.model, x, t), lambda i: "partial" if i % interval else "full")
        self.helper = DeepCacheSDHelper(pipe=types.SimpleNamespace(unet=case.model, scheduler=scheduler))
        self.helper.set_params(cache_interval=interval, cache_branch_id=0)

    def begin(self) -> None:
        self.helper.enable()  # resets its states and wraps the modules ...
        self.helper.unwrap_modules()  # ... which stay unwrapped outside this variant's steps

    def resume(self) -> None:
        self.helper.wrap_modules()

    def pause(self) -> None:
        self.helper.unwrap_modules()

    def end(self) -> None:
        self.helper.disable()


def lockstep(variants: dict[str, Variant], scheduler, latent: torch.Tensor, steps: int) -> tuple[dict, dict]:
    """Run every variant's DDIM loop, advancing all of them one step at a time (in a rotating order),
    so that a shared machine's changing load falls on all of them alike. Returns each variant's
    final latent and its step times (model call plus scheduler step) as ``(kind, seconds)``."""
    scheduler.set_timesteps(steps)
    latents = {name: latent.clone() for name in variants}
    seconds: dict[str, list] = {name: [] for name in variants}
    names = list(variants)
    for v in variants.values():
        v.begin()
    with torch.no_grad():
        for i, t in enumerate(tqdm(scheduler.timesteps, desc="steps", leave=False)):
            for name in names[i % len(names):] + names[:i % len(names)]:
                v, x = variants[name], latents[name]
                v.resume()
                start = time.perf_counter()
                latents[name] = scheduler.step(v.step(x, t), t, x).prev_sample
                seconds[name].append((v.kind(i), time.perf_counter() - start))
                v.pause()
    for v in variants.values():
        v.end()
    return latents, seconds


def _has_package() -> bool:
    try:
        import DeepCache  # noqa: F401
    except ImportError:
        return False
    return True


def measure_model(case: Case, steps: int, repeats: int, timing: bool, batched: bool, quick: bool = False,
                  fd_steps: Optional[int] = None) -> dict:
    """Compile the engines, cross-check their MACs, then time the loops in lockstep groups: DeepCache
    (sigec and the package) at ``steps``, FasterDiffusion at ``fd_steps`` (its key steps are defined
    for DDIM-50), each group with its own dense loop."""
    from diffusers import DDIMScheduler

    fd_steps = fd_steps or steps
    scheduler = DDIMScheduler()
    specs = {"sigec DeepCache N=3": DeepCache(3, 0), "sigec DeepCache N=5": DeepCache(5, 0),
             "sigec FasterDiffusion": FasterDiffusion()}
    if quick:  # one DeepCache engine is enough to exercise every column
        del specs["sigec DeepCache N=5"]
    if batched:
        specs["sigec FasterDiffusion batched"] = FasterDiffusion(batch_partial_steps=True)
    engines, compile_s = {}, {}
    for name, spec in tqdm(specs.items(), desc=f"{case.name}: compile", unit="engine"):
        start = time.perf_counter()
        engines[name] = sigec.compile(case.model, (case.latent, torch.tensor(999)), case.kwargs, temporal=spec,
                                      scheduler=scheduler)
        compile_s[name] = time.perf_counter() - start
    dense_step = next(iter(engines.values())).macs()["full"]
    flat = [case.latent, torch.tensor(999), *case.kwargs.values()]
    # the independent count: every distinct graph once under FlopCounterMode
    check = {"full": (dense_step, counted_macs(lambda: case.call(case.model, case.latent, torch.tensor(999))))}
    for name, engine in engines.items():
        if "batched" not in name:
            cut = list(engine.full(*flat))[engine.specialization.num_outputs:]
            check[name + " partial"] = (engine.macs()["partial"], counted_macs(lambda: engine.partial(*flat, *cut)))
    with torch.no_grad():  # warm-up: one step of every graph (kernel selection, allocator), not whole loops
        case.call(case.model, case.latent, torch.tensor(999))
        for engine in engines.values():
            engine.partial(*flat, *list(engine.full(*flat))[engine.specialization.num_outputs:])
    dense = Variant(lambda x, t: case.call(case.model, x, t))
    sigec_variant = lambda e: Variant(lambda x, t: case.call(e, x, t), lambda i: e.last_kind)  # noqa: E731
    groups = {steps: {"dense": dense}}
    groups.setdefault(fd_steps, {"dense": dense})
    for name, engine in engines.items():
        groups[fd_steps if "FasterDiffusion" in name else steps][name] = sigec_variant(engine)
    if _has_package():
        for name in [n for n in engines if "DeepCache" in n]:
            interval = engines[name].temporal.interval
            groups[steps][f"DeepCache package N={interval}"] = PackageVariant(case, scheduler, interval)
    rows = []
    for group_steps, variants in groups.items():
        rows += _time_group(case, variants, engines, scheduler, group_steps, dense_step,
                            repeats if timing else 1, timing)
    return {"model": case.name, "steps": steps, "fd_steps": fd_steps, "latent": list(case.latent.shape),
            "compile_s": compile_s, "macs_per_step": {"full": dense_step,
                                                      **{k: e.macs()["partial"] for k, e in engines.items()}},
            "flop_counter_check": {k: {"sigec": a, "FlopCounterMode": b, "ratio": a / b if b else None}
                                   for k, (a, b) in check.items()},
            "key_steps": {k: sorted(e.key_steps(fd_steps if "FasterDiffusion" in k else steps))
                          for k, e in engines.items()},
            "rows": rows}


def _time_group(case: Case, variants: dict, engines: dict, scheduler, steps: int, dense_step: int, rounds: int,
                timing: bool) -> list[dict]:
    """Rows of one lockstep group; ratios are against the group's own dense loop."""
    def loop_macs(name: str) -> int:
        if name == "dense":
            return steps * dense_step
        return engines[name.replace("DeepCache package", "sigec DeepCache")].loop_macs(steps)

    times: dict[str, list[float]] = {name: [] for name in variants}
    step_times: dict[str, dict[str, list[float]]] = {name: {"full": [], "partial": []} for name in variants}
    for _ in tqdm(range(rounds), desc=f"{case.name}: {steps}-step loops", unit="round"):
        finals, seconds = lockstep(variants, scheduler, case.latent, steps)
        for name, per_step in seconds.items():
            times[name].append(sum(sec for _, sec in per_step))
            for kind, sec in per_step:
                step_times[name][kind].append(sec)
    rows = []
    for name in variants:
        row = {"variant": name, "steps": steps, "macs_per_loop": loop_macs(name),
               "mac_ratio": steps * dense_step / loop_macs(name),
               "psnr_vs_dense_db": psnr(finals[name], finals["dense"]),
               "max_abs_diff_vs_dense": float((finals[name] - finals["dense"]).abs().max())}
        if name.startswith("DeepCache package"):
            twin = finals[name.replace("DeepCache package", "sigec DeepCache")]
            row["max_abs_diff_vs_sigec"] = float((finals[name] - twin).abs().max())
        if timing:
            t = times[name]
            # the speed-up of each round (its variants ran in lockstep, under the same load), then the median
            ratios = [d / v for d, v in zip(times["dense"], t)]
            row.update(loop_s=[statistics.median(t), min(t), max(t)], speedup=statistics.median(ratios),
                       speedup_range=[min(ratios), max(ratios)])
            # per-step medians: a lower-noise comparison of equal work (sigec vs the package)
            row.update({f"{kind}_step_s": statistics.median(v) if v else None for kind, v in step_times[name].items()})
            row["efficiency"] = row["speedup"] / row["mac_ratio"]  # how much of the MAC cut the wall clock keeps
        rows.append(row)
    return rows


def _s(t: Optional[list]) -> str:
    return f"{t[0]:.1f} [{t[1]:.1f}, {t[2]:.1f}]" if t else "-"


def _step(t: Optional[float]) -> str:
    return f"{t:.3f}" if t is not None else "-"


def format_table(result: dict) -> str:
    head = (f"{'variant':32s} {'steps':>5s} {'GMACs/loop':>10s} {'MAC ratio':>9s} {'loop s [min, max]':>22s} "
            f"{'speedup [min, max]':>20s} {'effic.':>6s} {'full step s':>11s} {'partial s':>9s} {'PSNR dB':>8s}")
    lines = [f"{result['model']}: DDIM loop, latent {'x'.join(map(str, result['latent']))}", head, "-" * len(head)]
    for r in result["rows"]:
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        if "speedup_range" in r and r["speedup_range"][0] != r["speedup_range"][1]:
            speed += " [{:.2f}, {:.2f}]".format(*r["speedup_range"])
        eff = f"{r['efficiency']:.2f}" if "efficiency" in r else "-"
        lines.append(f"{r['variant']:32s} {r['steps']:>5d} {r['macs_per_loop'] / 1e9:>10.1f} {r['mac_ratio']:>8.2f}x "
                     f"{_s(r.get('loop_s')):>22s} {speed:>20s} {eff:>6s} {_step(r.get('full_step_s')):>11s} "
                     f"{_step(r.get('partial_step_s')):>9s} {r['psnr_vs_dense_db']:>8.1f}")
    checks = ", ".join(f"{k} {v['ratio']:.4f}" for k, v in result["flop_counter_check"].items())
    lines.append(f"MACs sigec / FlopCounterMode: {checks}")
    lines.append("efficiency = speed-up / MAC ratio (1.00: the wall clock keeps the whole MAC cut)")
    for r in result["rows"]:
        if "max_abs_diff_vs_sigec" in r:
            lines.append(f"{r['variant']}: final latent differs from sigec's by at most "
                         f"{r['max_abs_diff_vs_sigec']:.2e}")
    return "\n".join(lines)


def measure_fidelity(steps_list: list[int], batch: int) -> Optional[dict]:
    """PSNR of the final samples against the dense loop on the trained digits model, per schedule;
    ``"auto"`` is calibrated on one batch of noise and measured on another."""
    from diffusers import DDIMScheduler

    try:
        model, scheduler_config = sigec.models.load("digits-ddpm")
    except Exception as exc:  # not shipped in this checkout
        print(f"digits-ddpm not available ({type(exc).__name__}: {exc}); fidelity skipped")
        return None
    size = model.config.sample_size
    noise = torch.randn(batch, model.config.in_channels, size, size, generator=torch.Generator().manual_seed(1))
    calibration = torch.randn(noise.shape, generator=torch.Generator().manual_seed(2))
    t0 = torch.tensor(999)
    out = {"model": "digits-ddpm", "batch": batch, "rows": []}
    for steps in steps_list:
        scheduler = DDIMScheduler.from_config(scheduler_config)
        dense = ddim_loop(lambda x, t: model(x, t).sample, scheduler, noise, steps)
        dc = sigec.compile(model, (noise, t0), temporal=DeepCache(3, 0), scheduler=scheduler)
        branch0 = dc.cut_modules()
        specs = {"DeepCache N=3": DeepCache(3, 0), "DeepCache N=5": DeepCache(5, 0),
                 "FasterDiffusion": FasterDiffusion(), "auto (MACs of N=3)": Reuse(branch0, "auto")}
        for name, spec in specs.items():
            engine = sigec.compile(model, (noise, t0), temporal=spec, scheduler=scheduler)
            if name.startswith("auto"):
                ddim_loop(lambda x, t: engine(x, t).sample, scheduler, calibration, steps)
            final = ddim_loop(lambda x, t: engine(x, t).sample, scheduler, noise, steps)
            out["rows"].append({"steps": steps, "schedule": name, "key_steps": sorted(engine.key_steps(steps)),
                                "mac_ratio": steps * engine.macs()["full"] / engine.loop_macs(steps),
                                "psnr_vs_dense_db": psnr(final, dense)})
    return out


def format_fidelity(result: dict) -> str:
    head = f"{'steps':>5s} {'schedule':22s} {'MAC ratio':>9s} {'PSNR dB':>8s}  key steps"
    lines = [f"fidelity on {result['model']} (batch {result['batch']}, final samples vs the dense loop)", head,
             "-" * len(head)]
    for r in result["rows"]:
        lines.append(f"{r['steps']:>5d} {r['schedule']:22s} {r['mac_ratio']:>8.2f}x {r['psnr_vs_dense_db']:>8.2f}  "
                     f"{r['key_steps']}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="sd1,church256", help="comma-separated: sd1, church256 (sd-tiny, church-small)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps per loop")
    p.add_argument("--fd-steps", type=int, default=None,
                   help="DDIM steps of the FasterDiffusion loops (default: --steps; its key steps are DDIM-50's)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds (each runs every variant's loop, in lockstep)")
    p.add_argument("--no-timing", action="store_true", help="skip the wall-clock measurements")
    p.add_argument("--batched", action="store_true", help="also FasterDiffusion with batch_partial_steps=True")
    p.add_argument("--fidelity-steps", default=None,
                   help="DDIM steps of the digits fidelity runs, comma-separated (default 20,50; 6 with --quick; "
                        "'' skips them)")
    p.add_argument("--quick", action="store_true", help="sd-tiny, 6 steps, one round (for tests)")
    p.add_argument("--json", default="out/temporal.json", help="where to write the results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.quick:
        names, args.steps, args.repeats = ["sd-tiny"], 6, 1
    if args.fidelity_steps is None:
        args.fidelity_steps = "6" if args.quick else "20,50"
    builders = {"sd1": sd_case, "sd-tiny": sd_case, "church256": church_case, "church-small": church_case}
    unknown = [n for n in names if n not in builders]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {sorted(builders)}")
    result = {"threads": args.threads, "torch": torch.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "repeats": None if args.no_timing else args.repeats, "deepcache_package": _has_package(),
              "models": []}
    for name in names:
        model_result = measure_model(builders[name](name), args.steps, args.repeats, not args.no_timing, args.batched,
                                     quick=args.quick, fd_steps=args.fd_steps)
        print(format_table(model_result), flush=True)
        result["models"].append(model_result)
    fidelity_steps = [int(s) for s in args.fidelity_steps.split(",") if s.strip()]
    if fidelity_steps:
        fidelity = measure_fidelity(fidelity_steps, batch=16)
        if fidelity is not None:
            print(format_fidelity(fidelity))
        result["fidelity"] = fidelity
    path = write_json(args.json, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
