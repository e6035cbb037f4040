"""Benchmark: fidelity of multi-step SDEdit with the trained digits DDPM, dense vs incremental.

Random weights say little about how an approximation looks, so this benchmark uses the model that
ships with sigec (``sigec.models.load("digits-ddpm")``, 16x16 digits). For each policy and edit
size it:

1. samples ``--samples`` digits (seeded DDIM) and edits each: an off-centre ellipse covering the
   fraction of the image (``sigec.frontends.edits.ellipse_mask``, as the other benchmarks) that swaps ink
   and paper;
2. runs SDEdit (noise to ``--strength``, then DDIM) on the originals through the engine, which
   records one cache slot per timestep, then on the edited digits with the same noise, densely
   and through the engine;
3. reports the PSNR of the final incremental images against the dense edited run (median, min
   and max over the digits), next to the PSNR of doing nothing (the original's SDEdit result),
   the MACs of the whole edit per digit and, unless ``--no-timing``, its latency for one digit.

Two mask protocols: ``fixed`` passes the edit mask to every step (the SIGE paper's protocol:
outside the mask the original trajectory is kept); ``difference`` lets the engine take each
step's mask from where the input differs from the recorded one (it grows as the edit spreads).

    python benchmarks/digits_sdedit.py --model digits                  # the README's table
    python benchmarks/digits_sdedit.py --model digits --no-timing      # fidelity and MACs only
    python benchmarks/digits_sdedit.py --quick                         # small and fast (tests)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

# Busy-waiting OpenMP threads make 2-thread timings on a shared machine jump by an order of
# magnitude; must be set before torch loads its OpenMP runtime. An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script or with -m

import sigec  # noqa: E402
from benchmarks.common import ellipse_mask, parse_fractions, psnr, time_interleaved, write_json  # noqa: E402
from sigec.frontends.demo import (ddim_sample, ddim_scheduler, engine_denoiser, sdedit, sdedit_timesteps,  # noqa: E402
                        timestep_batch, unet_denoiser)
from sigec.models import load  # noqa: E402

PROTOCOLS = ("fixed", "difference")


def sample_originals(unet, scheduler_config: dict, count: int, ddim_steps: int, seed: int) -> torch.Tensor:
    """``count`` seeded DDIM samples, in one batch."""
    size = unet.config.sample_size
    noise = torch.randn((count, unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(seed))
    return ddim_sample(unet_denoiser(unet), ddim_scheduler(scheduler_config, ddim_steps), noise)


def swap_ink(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The benchmark's edit: ink becomes paper and paper ink inside ``mask``."""
    return torch.where(mask, -images, images)


def measure(unet, engine, originals: torch.Tensor, fraction: float, protocol: str, scheduler, noise: torch.Tensor,
            strength: float) -> dict:
    """Fidelity and MACs of one edit size under one protocol, over a batch of digits."""
    h, w = originals.shape[-2:]
    mask = ellipse_mask(h, w, fraction)
    edited = swap_ink(originals, mask)
    engine.clear()
    unedited = sdedit(engine_denoiser(engine), scheduler, originals, noise, strength)   # records every step
    dense = sdedit(unet_denoiser(unet), scheduler, edited, noise, strength)
    step_masks = []

    def denoise(x, t):
        out = engine(x, timestep_batch(t, len(x)), mask=mask if protocol == "fixed" else None).sample
        step_masks.append(engine.last_stats["input_mask"])
        return out

    incremental = sdedit(denoise, scheduler, edited, noise, strength)
    dense_macs = incr_macs = 0
    for step_mask in step_masks:
        report = engine.report(mask=step_mask)
        dense_macs += report.dense_macs
        incr_macs += report.incremental_macs if step_mask.any() else 0
    per_digit = [psnr(incremental[i], dense[i]) for i in range(len(dense))]
    baseline = [psnr(unedited[i], dense[i]) for i in range(len(dense))]
    return {
        "policy": engine.context.settings.policy, "protocol": protocol, "fraction": fraction,
        "achieved_fraction": float(mask.float().mean()),
        "mean_step_mask_fraction": float(torch.stack([m.float().mean() for m in step_masks]).mean()),
        "steps": len(step_masks), "digits": len(dense),
        "psnr_db": statistics.median(per_digit), "psnr_db_min": min(per_digit), "psnr_db_max": max(per_digit),
        "psnr_no_recompute_db": statistics.median(baseline),
        "max_abs_err": float((incremental - dense).abs().max()),
        # per digit: the engine runs the batch, and every figure of the report scales with it
        "dense_macs": dense_macs // len(dense), "incremental_macs": incr_macs // len(dense),
        "mac_ratio": dense_macs / incr_macs if incr_macs else None,
    }


def time_edit(unet, policy: str, block_size: Optional[int], original: torch.Tensor, fraction: float, protocol: str, scheduler,
              noise: torch.Tensor, strength: float, repeats: int) -> dict:
    """Latency of one digit's whole edit: dense trajectory against incremental, timed alternately."""
    h, w = original.shape[-2:]
    mask = ellipse_mask(h, w, fraction)
    edited = swap_ink(original, mask)
    engine = sigec.compile(unet, (original, timestep_batch(scheduler.timesteps[0], 1)), policy=policy,
                           block_size=block_size)
    sdedit(engine_denoiser(engine), scheduler, original, noise, strength)   # record
    incr = engine_denoiser(engine, mask if protocol == "fixed" else None)
    dense_t, incr_t = time_interleaved(lambda: sdedit(unet_denoiser(unet), scheduler, edited, noise, strength),
                                       lambda: sdedit(incr, scheduler, edited, noise, strength), repeats)
    return {"dense_s": list(dense_t), "incremental_s": list(incr_t), "speedup": dense_t[0] / incr_t[0]}


def efficiency(row: dict) -> Optional[float]:
    """How much of the MAC cut the wall clock keeps: speed-up over MAC ratio."""
    return row["speedup"] / row["mac_ratio"] if row.get("speedup") and row.get("mac_ratio") else None


def _ms(t: Optional[list]) -> str:
    return f"{t[0] * 1e3:.0f} [{t[1] * 1e3:.0f},{t[2] * 1e3:.0f}]" if t else "-"


def format_table(rows: list[dict]) -> str:
    head = (f"{'policy':6} {'masks':10} {'frac req':>8} {'frac got':>8} {'step mask':>9} {'dense GMAC':>10} "
            f"{'incr GMAC':>9} {'MAC ratio':>9} {'PSNR dB [min,max]':>19} {'no-recompute':>12} "
            f"{'dense ms [min,max]':>19} {'incr ms [min,max]':>19} {'speedup':>7} {'effic.':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = f"{r['mac_ratio']:.2f}x" if r["mac_ratio"] else "-"
        quality = f"{r['psnr_db']:.1f} [{r['psnr_db_min']:.1f},{r['psnr_db_max']:.1f}]"
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        eff = f"{r['efficiency']:.2f}" if r.get("efficiency") else "-"
        lines.append(f"{r['policy']:6} {r['protocol']:10} {r['fraction']:>8.3f} {r['achieved_fraction']:>8.4f} "
                     f"{r['mean_step_mask_fraction']:>9.1%} {r['dense_macs'] / 1e9:>10.3f} "
                     f"{r['incremental_macs'] / 1e9:>9.3f} {ratio:>9} {quality:>19} "
                     f"{r['psnr_no_recompute_db']:>9.1f} dB {_ms(r.get('dense_s')):>19} "
                     f"{_ms(r.get('incremental_s')):>19} {speed:>7} {eff:>6}")
    lines.append("effic. = speed-up / MAC ratio (1.00: the wall clock keeps the whole MAC cut)")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]]) -> tuple[argparse.Namespace, list[float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits", choices=["digits"], help="the shipped digits-ddpm model")
    p.add_argument("--policies", default="sige,exact", help="comma-separated sigec.compile policies")
    p.add_argument("--protocols", default="fixed,difference", help=f"comma-separated mask protocols {PROTOCOLS}")
    p.add_argument("--fractions", default="0.012,0.05,0.15", help="comma-separated edit areas (fractions of the image)")
    p.add_argument("--samples", type=int, default=16, help="digits edited per configuration (one batch)")
    p.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps of the full schedule")
    p.add_argument("--strength", type=float, default=0.5, help="SDEdit strength: the share of the steps run")
    p.add_argument("--block-size", type=int, default=None, help="sigec.compile block_size (default: per resolution)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--repeats", type=int, default=5, help="timed edits per measurement")
    p.add_argument("--no-timing", action="store_true", help="skip the wall-clock measurements")
    p.add_argument("--quick", action="store_true", help="2 digits, 5%% edit, 10 DDIM steps, one repeat (for tests)")
    p.add_argument("--json", default="out/digits_sdedit.json", help="where to write the results")
    args = p.parse_args(argv)
    fractions = parse_fractions(p, args)
    args.policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    args.protocols = [s.strip() for s in args.protocols.split(",") if s.strip()]
    for policy in args.policies:
        if policy not in ("sige", "exact"):
            p.error(f"unknown policy {policy!r} in --policies; choose from sige, exact")
    for protocol in args.protocols:
        if protocol not in PROTOCOLS:
            p.error(f"unknown mask protocol {protocol!r} in --protocols; choose from {', '.join(PROTOCOLS)}")
    if args.samples < 1 or args.ddim_steps < 1 or args.repeats < 1 or (args.block_size or 1) < 1:
        p.error("--samples, --ddim-steps, --repeats and --block-size must be at least 1")
    if args.quick:
        fractions, args.samples, args.ddim_steps, args.repeats = [0.05], 2, 10, 1
    return args, fractions


def main(argv: Optional[list[str]] = None) -> dict:
    args, fractions = parse_args(argv)
    torch.set_num_threads(args.threads)
    unet, scheduler_config = load("digits-ddpm")
    scheduler = ddim_scheduler(scheduler_config, args.ddim_steps)
    steps = len(sdedit_timesteps(scheduler, args.strength))
    originals = sample_originals(unet, scheduler_config, args.samples, args.ddim_steps, args.seed)
    noise = torch.randn(originals.shape, generator=torch.Generator().manual_seed(args.seed + 1))
    print(f"digits-ddpm (16x16), {args.samples} digits, SDEdit strength {args.strength}: {steps} of "
          f"{args.ddim_steps} DDIM steps, {args.threads} thread(s)", flush=True)
    rows = []
    configs = [(policy, protocol, f) for policy in args.policies for protocol in args.protocols for f in fractions]
    engines = {}
    for policy, protocol, fraction in tqdm(configs, desc="configurations", unit="edit"):
        if policy not in engines:
            start = time.perf_counter()
            engines[policy] = sigec.compile(unet, (originals, timestep_batch(scheduler.timesteps[0], len(originals))),
                                            policy=policy, block_size=args.block_size)
            print(f"compiled ({policy}) in {time.perf_counter() - start:.2f} s", flush=True)
        row = measure(unet, engines[policy], originals, fraction, protocol, scheduler, noise, args.strength)
        if not args.no_timing:
            row.update(time_edit(unet, policy, args.block_size, originals[:1], fraction, protocol, scheduler,
                                 noise[:1], args.strength, args.repeats))
            row["efficiency"] = efficiency(row)
        rows.append(row)
    print(format_table(rows))
    result = {"model": "digits-ddpm", "resolution": list(originals.shape[-2:]), "samples": args.samples,
              "ddim_steps": args.ddim_steps, "strength": args.strength, "sdedit_steps": steps, "seed": args.seed,
              "block_size": args.block_size, "threads": args.threads, "repeats": None if args.no_timing else args.repeats,
              "timing_batch": 1, "torch": torch.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "rows": rows}
    path = write_json(args.json, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
