"""The ``sigec`` command line: ``sigec demo`` (more subcommands, e.g. ``dump`` and ``bench``, to come)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

# Timings on a shared machine: busy-waiting OpenMP threads turn contention into 10-50x slowdowns
# of small kernels. Must be set before torch loads its OpenMP runtime; a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sigec  # noqa: E402


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _cmd_demo(args: argparse.Namespace) -> int:
    # imported here so that `sigec --version` and `--help` do not pay for diffusers
    from sigec.demo import run_demo

    run_demo(args.out, policy=args.policy, edit_fraction=args.edit_fraction, threads=args.threads,
             repeats=args.repeats, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each subcommand sets ``func``, its handler."""
    parser = argparse.ArgumentParser(
        prog="sigec", description="Compile PyTorch image generators into incremental engines.")
    parser.add_argument("--version", action="version", version=f"sigec {sigec.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="edit an image with the built-in UNet; compare dense and incremental",
                          description="Record the built-in DDPM-style UNet on a synthetic image, paint an "
                                      "elliptical edit, and compare dense and incremental runs "
                                      "(latency, MACs, PSNR); writes a five-panel PNG.")
    demo.add_argument("--out", default="sigec-demo.png", help="PNG to write (default: %(default)s)")
    demo.add_argument("--policy", choices=("sige", "exact"), default="sige",
                      help="compile policy (default: %(default)s)")
    demo.add_argument("--edit-fraction", type=_fraction, default=0.05,
                      help="fraction of the image the edit covers (default: %(default)s)")
    demo.add_argument("--threads", type=_positive_int, default=2,
                      help="torch CPU threads for the timings (default: %(default)s)")
    demo.add_argument("--repeats", type=_positive_int, default=5,
                      help="timed runs per variant, after one warm-up (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the weights and noise (default: %(default)s)")
    demo.set_defaults(func=_cmd_demo)
    # future: sub.add_parser("dump", ...) and sub.add_parser("bench", ...), each with set_defaults(func=...)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``sigec`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    # the library logs under "sigec"; show its warnings always, its progress with -v
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(levelname)s: %(message)s")
    try:
        return args.func(args)
    except (sigec.EngineError, sigec.CaptureError, ValueError, OSError) as exc:
        print(f"sigec: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
