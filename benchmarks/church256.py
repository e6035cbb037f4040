"""Benchmark: DDPM LSUN-church-256 UNet, dense vs incremental, over elliptical edits.

For each edit size it reports the MACs ``engine.report()`` counts, the PSNR of the incremental
output against a dense run on the edited input, and (unless ``--no-timing``) wall-clock times.

    python benchmarks/church256.py                                  # full 256x256 model
    python benchmarks/church256.py --config church-small            # same structure, 64x64
    python benchmarks/church256.py --no-timing --json out/x.json    # MACs and quality only
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

# On this 2-vCPU machine libgomp's default spin-waiting makes 2-thread runs drift between ~20 ms
# and ~1.7 s per church-small forward (both cores spinning at barriers); a passive wait policy
# keeps them stable. It must be set before torch loads libgomp; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

# Make ``benchmarks.common`` importable both as ``python benchmarks/church256.py`` and with -m.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sigec  # noqa: E402
from benchmarks.common import ellipse_mask, psnr, time_call, write_json  # noqa: E402
from sigec.models import UNET_CONFIGS, ddpm_unet  # noqa: E402

TIMESTEP = 500
SEED_X, SEED_EDIT = 0, 1  # seeds of the original input and of the noise pasted into the edit


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="church256", choices=["church256", "church-small"],
                   help="UNet configuration from sigec.models.UNET_CONFIGS")
    p.add_argument("--policy", default="sige", choices=["sige", "exact"], help="sigec.compile policy")
    p.add_argument("--fractions", default="0.012,0.05,0.15,0.30",
                   help="comma-separated edit areas as fractions of the image")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement")
    p.add_argument("--no-timing", action="store_true", help="skip the wall-clock measurements")
    p.add_argument("--json", default="out/church256.json", help="where to write the results")
    args = p.parse_args(argv)
    try:
        args.fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    except ValueError:
        p.error(f"--fractions must be comma-separated numbers, got {args.fractions!r}")
    if not args.fractions:
        p.error("--fractions is empty")
    return args


def seeded_randn(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def active_blocks_total(engine, mask: torch.Tensor) -> int:
    """Active blocks summed over every (mask, grid) index set the incremental graph gathers with."""
    blocks = engine.mask_stats(mask)["blocks"]
    return int(sum(blocks[key].shape[0] for key in engine.signature.blocks))


def measure_fraction(engine, model, x: torch.Tensor, t: torch.Tensor, fraction: float,
                     timing: bool, repeats: int) -> dict:
    """MACs, quality and (optionally) timings of one elliptical edit of ``fraction`` of the image."""
    h, w = x.shape[-2:]
    mask = ellipse_mask(h, w, fraction)
    # The edit replaces the masked region with other noise; nothing outside it changes.
    x_edit = torch.where(mask, seeded_randn(tuple(x.shape), SEED_EDIT), x)

    report = engine.report(mask=mask)
    dense_macs, incr_macs = report.dense_macs, report.incremental_macs

    with torch.no_grad():
        y_incr = engine(x_edit, t, mask=mask).sample
        y_dense = model(x_edit, t).sample
    row = {
        "fraction": fraction,
        "achieved_fraction": float(mask.float().mean()),
        "active_blocks": active_blocks_total(engine, mask),
        "dense_macs": dense_macs,
        "incremental_macs": incr_macs,
        "mac_ratio": dense_macs / incr_macs if incr_macs else None,
        "psnr_db": psnr(y_incr, y_dense),
        "max_abs_err": float((y_incr - y_dense).abs().max()),
    }
    if timing:
        dense_t, incr_t = time_interleaved(lambda: model(x_edit, t),
                                           lambda: engine(x_edit, t, mask=mask), repeats)
        row.update(dense_s=list(dense_t), incremental_s=list(incr_t), speedup=dense_t[0] / incr_t[0])
    return row


def time_interleaved(dense, incremental, repeats: int) -> tuple[tuple, tuple]:
    """``(median, min, max)`` seconds of each function, timed alternately.

    This machine's speed drifts by an order of magnitude over seconds (shared cores), so the
    two are timed turn by turn: each speed-up compares calls made under the same conditions.
    The engine is never committed, so every incremental call edits the same recorded baseline.
    """
    samples: tuple[list, list] = ([], [])
    with torch.no_grad():
        dense(), incremental()  # warm-up
        for _ in range(repeats):
            for fn, out in zip((dense, incremental), samples):
                out.append(time_call(fn, 1, warmup=0)[0])
    return tuple((statistics.median(s), min(s), max(s)) for s in samples)


def _ms(t: Optional[list]) -> str:
    return f"{t[0] * 1e3:.0f} [{t[1] * 1e3:.0f},{t[2] * 1e3:.0f}]" if t else "-"


def format_table(rows: list[dict]) -> str:
    head = (f"{'frac req':>8} {'frac got':>8} {'blocks':>7} {'dense GMAC':>10} {'incr GMAC':>9} "
            f"{'MAC ratio':>9} {'PSNR dB':>8} {'dense ms [min,max]':>20} {'incr ms [min,max]':>20} "
            f"{'speedup':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        inc = f"{r['incremental_macs'] / 1e9:.2f}" if r["incremental_macs"] is not None else "-"
        ratio = f"{r['mac_ratio']:.2f}x" if r["mac_ratio"] else "-"
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        lines.append(f"{r['fraction']:>8.3f} {r['achieved_fraction']:>8.4f} {r['active_blocks']:>7d} "
                     f"{r['dense_macs'] / 1e9:>10.2f} {inc:>9} {ratio:>9} {r['psnr_db']:>8.2f} "
                     f"{_ms(r.get('dense_s')):>20} {_ms(r.get('incremental_s')):>20} {speed:>7}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    res = UNET_CONFIGS[args.config]["sample_size"]
    model = ddpm_unet(args.config)
    x = seeded_randn((1, 3, res, res), SEED_X)
    t = torch.tensor([TIMESTEP])

    start = time.perf_counter()
    engine = sigec.compile(model, (x, t), policy=args.policy)
    compile_s = time.perf_counter() - start
    print(f"{args.config} ({res}x{res}), policy {args.policy}, {args.threads} thread(s): "
          f"compile {compile_s:.2f} s", flush=True)

    start = time.perf_counter()
    engine(x, t)  # the recording (dense) run every edit below is compared against
    record_s = time.perf_counter() - start
    print(f"record run {record_s:.2f} s", flush=True)

    rows = []
    for fraction in tqdm(args.fractions, desc="edit sizes", unit="mask"):
        rows.append(measure_fraction(engine, model, x, t, fraction, not args.no_timing, args.repeats))
    print(format_table(rows))

    result = {"config": args.config, "resolution": res, "policy": args.policy, "threads": args.threads,
              "repeats": None if args.no_timing else args.repeats, "timestep": TIMESTEP,
              "torch": torch.__version__,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "compile_s": compile_s, "record_s": record_s, "rows": rows}
    path = write_json(args.json, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
