"""Benchmark: patch-wise execution in bounded memory (sigec tiles versus diffusers' enable_tiling).

Cases (``--cases``): ``vae512`` and ``vae1024`` are the Stable Diffusion ``AutoencoderKL`` decoder
(block_out_channels 128, 256, 512, 512; two layers per block; 32 groups; seeded random weights)
on a 64x64 and a 128x128 latent, giving 512x512 and 1024x1024 images; ``church512`` is the DDPM
church-256 UNet (one denoising step) on a 512x512 input. Every case runs untiled, then sigec
with synchronized statistics at each ``--tiles`` grid (n x n), then, for the VAE cases,
diffusers' ``enable_tiling()`` at the same tile sizes (``output / n`` pixels; 1x1 is diffusers'
untiled decode, so it is skipped) and sigec with ``norm_stats="preview"`` at ``--preview-tiles``.

Each configuration runs in a fresh process: it builds the model and the input, compiles (not
measured), then measures one call: the resident-set growth during the call (``/proc/self/status``
VmHWM after the peak is reset through ``/proc/self/clear_refs``, minus the resident set before
it) and its wall-clock time. With ``--profiler-memory`` a second call runs under
``torch.profiler`` (``profile_memory=True``), whose allocation events give the peak of the
tensors the CPU allocator holds (no oneDNN scratch, no allocator slack). The parent compares
every output with the case's untiled output (PSNR with the untiled output's range as peak, and
the largest absolute error). The sigec rows also give the plan's estimated peak.

    python benchmarks/tiled_memory.py                                # every case (about 30 min on 2 cores)
    python benchmarks/tiled_memory.py --cases vae1024 --tiles 4      # the acceptance rows
    python benchmarks/tiled_memory.py --quick                        # a small VAE, for tests
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

# Busy-waiting OpenMP threads distort timings on a shared machine; before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script or with -m

from benchmarks.common import write_json  # noqa: E402
from sigec.frontends.measure import psnr  # noqa: E402

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
              sample_size=512)
QUICK_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
                 sample_size=64)
log = logging.getLogger("benchmarks.tiled_memory")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# the worker: one configuration in a fresh process


class Decoder(torch.nn.Module):
    """``vae.decode(z).sample`` as a module (sigec compiles it; the VAE's code is unchanged)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample


def _build(config: dict):
    """``(callable model, input tuple, the module sigec compiles, output picker)``."""
    if config["model"] == "church":
        from sigec.models import ddpm_unet

        unet = ddpm_unet("church256" if not config.get("small") else "church-small", resolution=config["resolution"])
        x = torch.randn((1, 3, config["resolution"], config["resolution"]), generator=torch.Generator().manual_seed(0))
        return unet, (x, torch.tensor([500])), unet, (lambda out: out.sample)
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    arch = QUICK_VAE if config.get("small") else SD_VAE
    n = len(arch["block_out_channels"])
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        **arch).eval()
    z = torch.randn((1, 4, config["latent"], config["latent"]), generator=torch.Generator().manual_seed(1))
    return vae, (z,), Decoder(vae).eval(), (lambda out: out)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
        return True
    except OSError:
        return False


def _profiler_peak(call) -> int:
    """Peak bytes the CPU allocator held during ``call()`` above its start, from the profiler's
    allocation events (each op's own allocations minus frees, in start order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = call()
    del out
    deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak


def worker(config: dict) -> dict:
    """Build, compile, then measure one call of the configuration ``config``."""
    torch.set_num_threads(config["threads"])
    import gc

    vae, inputs, module, pick = _build(config)
    kind = config["kind"]
    compile_s = 0.0
    report = None
    if kind == "untiled":
        def call():
            return pick(vae.decode(*inputs).sample if config["model"] == "vae" else vae(*inputs))
    elif kind == "diffusers":
        vae.enable_tiling()
        vae.tile_sample_min_size = config["tile_px"]
        vae.tile_latent_min_size = config["tile_px"] // 2 ** (len(vae.config.block_out_channels) - 1)

        def call():
            return vae.decode(*inputs).sample
    else:
        from sigec.tiling import compile_tiled

        start = time.perf_counter()
        tiled = compile_tiled(module, inputs, tiles=(config["tiles"], config["tiles"]), norm_stats=config["norm_stats"],
                              cache_dtype=DTYPES[config["cache_dtype"]] if config.get("cache_dtype") else None,
                              cache_budget_bytes=config.get("budget"))
        compile_s = time.perf_counter() - start
        report = tiled.report()

        def call():
            return pick(tiled(*inputs))
    gc.collect()
    times = []
    out = None
    growth = []
    for _ in range(config["repeats"]):
        out = None
        gc.collect()
        exact = _reset_peak()
        before = _rss_kib("VmRSS")
        start = time.perf_counter()
        with torch.no_grad():
            out = call()
        times.append(time.perf_counter() - start)
        growth.append((_rss_kib("VmHWM") - before) * 1024 if exact else None)
    torch.save(out.detach().clone(), config["out"])
    result = {"time_s": times, "peak_growth_bytes": growth, "compile_s": compile_s, "profiler_peak_bytes": None}
    if config.get("profiler_memory"):
        out = None
        gc.collect()
        with torch.no_grad():
            result["profiler_peak_bytes"] = _profiler_peak(call)
    if report is not None:
        result.update(estimated_peak_bytes=report.estimated_peak_bytes, untiled_estimate_bytes=report.untiled_peak_bytes,
                      estimated_work=report.estimated_macs / report.untiled_macs, phases=len(report.phases),
                      held=len(report.held), recomputed=len(report.recomputed), plan=str(report))
    return result


# ---------------------------------------------------------------------------------------------
# the parent: cases, configurations, subprocesses, comparison

#: each case's storage dtype for held values: float16 halves their memory on the VAE at about 84 dB;
#: on the church UNet it costs about 1e-3 of largest error (the acceptance bound), so it keeps float32
CASES = {"vae512": dict(model="vae", latent=64, cache_dtype="float16"),
         "vae1024": dict(model="vae", latent=128, cache_dtype="float16"),
         "church512": dict(model="church", resolution=512, cache_dtype="float32")}
QUICK_CASES = {"vae-quick": dict(model="vae", latent=16, small=True, cache_dtype="float16")}


def configurations(case: dict, args) -> list[dict]:
    common = dict(case, threads=args.threads, repeats=args.repeats, profiler_memory=args.profiler_memory)
    out_px = output_px(case)
    configs = [dict(common, kind="untiled", name="untiled")]
    held = args.cache_dtype or case["cache_dtype"]
    for t in args.tiles:
        configs.append(dict(common, kind="sigec", tiles=t, norm_stats="exact", cache_dtype=held,
                            budget=args.budget_mib * 2**20 if args.budget_mib else None,
                            name=f"sigec {t}x{t} exact (held {held})"))
    if case["model"] == "vae":
        if not args.no_diffusers:
            for t in args.tiles:
                if t > 1:
                    configs.append(dict(common, kind="diffusers", tile_px=out_px // t,
                                        name=f"diffusers tiled {out_px // t}-px ({t}x{t})"))
        for t in args.preview_tiles:
            configs.append(dict(common, kind="sigec", tiles=t, norm_stats="preview", cache_dtype=None,
                                name=f"sigec {t}x{t} preview"))
    return configs


def output_px(case: dict) -> int:
    if case["model"] == "church":
        return case["resolution"]
    levels = len((QUICK_VAE if case.get("small") else SD_VAE)["block_out_channels"])
    return case["latent"] * 2 ** (levels - 1)


def run_config(config: dict, folder: str) -> dict:
    config = dict(config, out=os.path.join(folder, f"{len(os.listdir(folder))}.pt"))
    cmd = [sys.executable, __file__, "--worker", json.dumps(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"configuration {config['name']!r} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["output_path"] = config["out"]
    return result


def _fmt_time(ts: list) -> str:
    ts = sorted(ts)
    med = ts[len(ts) // 2]
    return f"{med:.1f}" + (f" [{ts[0]:.1f},{ts[-1]:.1f}]" if len(ts) > 1 else "")


def _mib(b) -> str:
    return f"{b / 2**20:.0f}" if b is not None else "-"


def run_case(name: str, case: dict, args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        reference = None
        for config in configurations(case, args):
            log.info("%s: running %s ...", name, config["name"])
            r = run_config(config, folder)
            out = torch.load(r.pop("output_path"))
            if reference is None:
                reference = out
            r.update(name=config["name"], kind=config["kind"], psnr_db=psnr(out, reference),
                     max_abs_err=float((out - reference).abs().max()))
            rows.append(r)
    base = rows[0]
    for r in rows:
        g, b = r["peak_growth_bytes"][0], base["peak_growth_bytes"][0]
        r["memory_fraction"] = g / b if g is not None and b else None
        r["time_ratio"] = min(r["time_s"]) / min(base["time_s"])
        # speed-up over MAC ratio against the untiled run: estimated work / time ratio
        r["efficiency"] = r["estimated_work"] / r["time_ratio"] if r.get("estimated_work") else None
    return rows


def table(name: str, case: dict, rows: list[dict]) -> str:
    px = output_px(case)
    head = (f"{'run':36s} {'peak MiB':>9s} {'of untiled':>10s} {'est MiB':>8s} {'prof MiB':>8s} {'time s':>14s} "
            f"{'x untiled':>9s} {'effic.':>6s} {'PSNR dB':>8s} {'max err':>9s}")
    lines = [f"{name}: {case['model']} {px}x{px}", head, "-" * len(head)]
    for r in rows:
        eff = f"{r['efficiency']:.2f}" if r.get("efficiency") else "-"
        frac = f"{r['memory_fraction']:.0%}" if r["memory_fraction"] is not None else "-"
        lines.append(f"{r['name']:36s} {_mib(r['peak_growth_bytes'][0]):>9s} {frac:>10s} "
                     f"{_mib(r.get('estimated_peak_bytes')):>8s} {_mib(r.get('profiler_peak_bytes')):>8s} "
                     f"{_fmt_time(r['time_s']):>14s} {r['time_ratio']:9.2f} {eff:>6s} {r['psnr_db']:8.1f} {r['max_abs_err']:9.2e}")
    lines.append("effic. = speed-up / MAC ratio against the untiled run (estimated work / time ratio)")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated cases among "
                                                            f"{', '.join(CASES)} (default: all)")
    p.add_argument("--tiles", default="1,2,4", help="comma-separated grid sizes n (n x n tiles) for sigec exact and "
                                                    "diffusers (default %(default)s)")
    p.add_argument("--preview-tiles", default="4,8", help="grid sizes for sigec norm_stats='preview' (VAE cases only)")
    p.add_argument("--cache-dtype", choices=sorted(DTYPES), default=None,
                   help="storage dtype of values held between phases (default: float16 for the VAE, float32 for "
                        "the church UNet)")
    p.add_argument("--budget-mib", type=int, default=None, help="cache_budget_bytes for sigec, in MiB")
    p.add_argument("--no-diffusers", action="store_true", help="skip diffusers' enable_tiling")
    p.add_argument("--profiler-memory", action="store_true",
                   help="also measure one more call under torch.profiler (allocator peak; slower)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="measured calls per configuration (same process)")
    p.add_argument("--quick", action="store_true", help="a small VAE (latent 16), 2x2 tiles, for tests")
    p.add_argument("--json", default="out/tiled_memory.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return {}
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        cases = QUICK_CASES
        args.tiles, args.preview_tiles, args.repeats, args.profiler_memory = "2", "2", 1, True
    else:
        names = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = [c for c in names if c not in CASES]
        if unknown:
            p.error(f"unknown case(s) {unknown}; choose among {', '.join(CASES)}")
        cases = {c: CASES[c] for c in names}
    try:
        args.tiles = [int(t) for t in str(args.tiles).split(",") if t.strip()]
        args.preview_tiles = [int(t) for t in str(args.preview_tiles).split(",") if t.strip()]
    except ValueError:
        p.error("--tiles and --preview-tiles take comma-separated integers")
    result = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "cases": {}}
    for name, case in cases.items():
        rows = run_case(name, case, args)
        print(table(name, case, rows) + "\n", flush=True)
        result["cases"][name] = {"model": case["model"], "output": [output_px(case)] * 2, "rows": rows}
    path = write_json(args.json, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
