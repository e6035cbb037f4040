"""The ``sigec`` command line: ``sigec dump``, ``sigec bench``, ``sigec demo``, ``sigec editor`` and
``sigec costs``.

Exit status: 0 on success, 1 when a command fails (one ``sigec: error: ...`` line on stderr;
``--debug`` adds the traceback), 2 for usage errors, 130 when interrupted.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import traceback
from typing import Optional, Sequence


import sigec  # noqa: E402


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _landscape_classes() -> tuple[str, ...]:
    from sigec.models.landscape import CLASSES

    return CLASSES


def _write_output(text: str, out: Optional[str]) -> None:
    """Write ``text`` to ``out`` (creating its folder) or to stdout."""
    if out is None or out == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    from pathlib import Path

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path} ({len(text.encode('utf-8')):,} bytes)", file=sys.stderr)


def _load_with_mask(args: argparse.Namespace):
    """The target and, when ``--mask`` names a file, the mask read from it (before compiling)."""
    from sigec.frontends.dump import load_target, read_mask_file

    mask = read_mask_file(args.mask) if args.mask is not None else None  # fail fast on a bad file
    return load_target(args.target), mask


def _cmd_dump(args: argparse.Namespace) -> int:
    from sigec.frontends import dump

    if args.after is not None:
        args.passes = True
    if args.passes and args.format != "text":
        raise dump.UsageError(f"--passes prints text; it cannot be combined with --format {args.format}")
    if args.passes:
        analysis, incremental = dump.pass_names()
        if args.after is not None and args.after not in analysis + incremental:
            raise dump.UsageError(f"unknown pass {args.after!r} for --after; passes: "
                                  f"{', '.join(analysis + incremental)}")
        target = dump.load_target(args.target)
        if args.out is None or args.out == "-":
            dump.dump_pass_graphs(target, args.policy, args.block_size, args.after,
                                  lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        else:
            chunks: list[str] = []
            dump.dump_pass_graphs(target, args.policy, args.block_size, args.after, chunks.append)
            _write_output("".join(chunks), args.out)
        return 0
    if args.tiles is not None:  # the tiled plan instead of the incremental one
        from sigec.tiling import compile_tiled, parse_tiles, render_plan

        target = dump.load_target(args.target)
        module = compile_tiled(target.model, target.args, target.kwargs or None, tiles=parse_tiles(args.tiles))
        _write_output(render_plan(module, args.format), args.out)
        return 0
    target, preloaded = _load_with_mask(args)
    engine = dump.compile_target(target, args.policy, args.block_size)
    mask, source = dump.resolve_mask(engine, args.mask, args.mask_fraction, preloaded)
    _write_output(dump.render(dump.build_dump(target, engine, mask, source), args.format), args.out)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from sigec.frontends import bench, dump

    target, preloaded = _load_with_mask(args)
    results = bench.run_bench(
        target, lambda engine: dump.resolve_mask(engine, args.mask, args.mask_fraction, preloaded),
        policy=args.policy, block_size=args.block_size, repeats=args.repeats, warmup=args.warmup,
        threads=args.threads, seed=args.seed)
    text = bench.bench_json(results) if args.format == "json" else bench.format_bench(results)
    _write_output(text, args.out)
    return 0


def _add_target_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="TARGET",
                   help="package.module:factory (factory() returns (model, args) or (model, args, kwargs)), "
                        "path/to/file.py:factory, or a .pt2 file written by torch.export.save")
    masks = p.add_mutually_exclusive_group()
    masks.add_argument("--mask", metavar="FILE",
                       help="edit mask: a PNG (pixels lighter than mid-grey are edited) or a .npy array (True or "
                            "above 0.5 is edited), "
                            "at the model's input resolution")
    masks.add_argument("--mask-fraction", type=_fraction, default=0.05, metavar="F",
                       help="without --mask: an ellipse covering this fraction of the image "
                            "(default: %(default)s)")
    p.add_argument("--policy", choices=("sige", "exact"), default="sige",
                   help="compile policy (default: %(default)s)")
    p.add_argument("--block-size", type=_positive_int, default=None, metavar="N",
                   help="block edge at every resolution (default: chosen per resolution)")
    p.add_argument("--out", metavar="PATH", help="write the output to PATH instead of stdout")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the traceback of an error")


def _cmd_demo(args: argparse.Namespace) -> int:
    # imported here so that `sigec --version` and `--help` do not pay for diffusers
    from sigec.frontends.demo import run_demo

    run_demo(args.out, model=args.model, policy=args.policy, edit_fraction=args.edit_fraction,
             threads=args.threads, repeats=args.repeats, seed=args.seed, brush_class=args.brush_class)
    return 0


def _cmd_editor(args: argparse.Namespace) -> int:
    try:
        from sigec.frontends.editor.server import EditorError, serve
    except ImportError as exc:
        print(f"sigec editor: error: {exc}; install the editor's server with: pip install 'sigec[editor]'",
              file=sys.stderr)
        return 1
    try:
        serve(args.model, port=args.port, threads=args.threads, policy=args.policy)
    except EditorError as exc:
        print(f"sigec editor: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_costs(args: argparse.Namespace) -> int:
    import torch

    from sigec.ir import costs

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    measured = costs.machine_costs(args.device, dtype, remeasure=args.remeasure)
    if args.format == "json":
        text = json.dumps(dataclasses.asdict(measured), indent=1)
    else:
        text = "\n".join([f"{f.name:20s} {getattr(measured, f.name)!r}" for f in dataclasses.fields(measured)]
                         + [f"cache: {costs.cache_file()}"])
    _write_output(text, args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each subcommand sets ``func``, its handler."""
    parser = argparse.ArgumentParser(
        prog="sigec", description="Compile PyTorch image generators into incremental engines.")
    parser.add_argument("--version", action="version", version=f"sigec {sigec.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from sigec.frontends.dump import FORMATS

    dump = sub.add_parser(
        "dump", help="show how a model is compiled: per-node decisions, block maps, MACs, graphs",
        description="Compile TARGET and show, for an edit mask, every node's op, shape, resolution, mask "
                    "fraction, decision (sparse / dense / fallback / static, and why), block size, halo "
                    "and dense and incremental MACs; the block maps of each resolution; the totals; and "
                    "the generated recording and incremental graphs. With --passes, print the graph after "
                    "each compiler pass instead.",
        epilog="TARGET examples: mypkg.models:make_unet, ./nets.py:build, model.pt2. A factory takes no "
               "arguments; modules are imported with the working directory on sys.path.")
    _add_target_options(dump)
    dump.add_argument("--format", choices=FORMATS, default="text",
                      help="text: a table; json: machine-readable; dot: the analysed graph (Graphviz); "
                           "svg: block maps; html: one self-contained page (default: %(default)s)")
    dump.add_argument("--passes", action="store_true",
                      help="print the pass pipeline and the graph after each pass")
    dump.add_argument("--after", metavar="PASS", help="with --passes: stop after this pass (implies --passes)")
    dump.add_argument("--tiles", metavar="N|RxC", help="show the tiled-execution plan for N x N (or R x C) tiles "
                      "instead: tile regions, halos, synchronization phases, held values, peak-memory estimate "
                      "(text or json)")
    dump.set_defaults(func=_cmd_dump)

    bench = sub.add_parser(
        "bench", help="time the dense model against the incremental engine for an edit mask",
        description="Compile TARGET, record its example inputs, edit the pixels inside the mask and time "
                    "dense runs of the model against incremental runs of the engine (median [min, max] "
                    "over --repeats runs); also prints MACs and the PSNR of the incremental output.")
    _add_target_options(bench)
    bench.add_argument("--repeats", type=_positive_int, default=10,
                       help="timed runs per variant (default: %(default)s)")
    bench.add_argument("--warmup", type=_non_negative_int, default=1, help="untimed runs first (default: %(default)s)")
    bench.add_argument("--threads", type=_positive_int, default=None,
                       help="torch CPU threads (default: torch's)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the edit's noise (default: %(default)s)")
    bench.add_argument("--format", choices=("text", "json"), default="text",
                       help="output format (default: %(default)s)")
    bench.set_defaults(func=_cmd_bench)

    demo = sub.add_parser(
        "demo", help="paint a brush stroke on a landscape and render it densely and incrementally",
        description="Paint a brush stroke of a class (2 percent of the pixels by default) onto a 256x512 label map and "
                    "render it with the trained landscape generator that ships with sigec, densely and through "
                    "the incremental engine. Prints latency, MACs and PSNR and writes a six-panel PNG: label "
                    "map, stroke, recomputed blocks, dense result, incremental result, difference. "
                    "--model digits-ddpm SDEdits a digit with the shipped digits DDPM (one cache slot per "
                    "denoising step); --model random-unet runs one step of a seeded random 64x64 UNet.")
    demo.add_argument("--out", default="sigec-demo.png", help="PNG to write (default: %(default)s)")
    demo.add_argument("--model", choices=("landscape", "digits-ddpm", "random-unet"), default="landscape",
                      help="landscape and digits-ddpm: the shipped trained models; random-unet: one step of a "
                           "seeded random UNet on a synthetic picture (default: %(default)s)")
    demo.add_argument("--policy", choices=("sige", "exact"), default=None,
                      help="compile policy (default: exact for landscape, sige for the UNets)")
    demo.add_argument("--edit-fraction", type=_fraction, default=None, metavar="F",
                      help="landscape: the brush stroke's share of the pixels (default 0.02); digits-ddpm and "
                           "random-unet: an elliptical edit of this size instead of the bar across the top (a "
                           "5%% ellipse)")
    demo.add_argument("--brush-class", choices=_landscape_classes(), default="water",
                      help="landscape: the class the stroke paints (default: %(default)s)")
    demo.add_argument("--threads", type=_positive_int, default=2,
                      help="torch CPU threads for the timings (default: %(default)s)")
    demo.add_argument("--repeats", type=_positive_int, default=5,
                      help="timed runs per variant, after one warm-up (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0,
                      help="landscape: of the noise map (the picture's style); digits-ddpm: of the sampled "
                           "digit and the SDEdit noise; random-unet: of the weights and picture "
                           "(default: %(default)s)")
    demo.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                      help="show the traceback of an error")
    demo.set_defaults(func=_cmd_demo)

    editor = sub.add_parser(
        "editor", help="paint label maps in the browser and watch them re-render incrementally",
        description="Start the interactive editor on http://127.0.0.1:PORT/: pick a class, paint on the label "
                    "map, and the generator re-renders only what each stroke touched. The page shows each "
                    "stroke's incremental latency against the dense latency, the edit area and the blocks "
                    "recomputed. Needs the editor extra: pip install 'sigec[editor]'.")
    editor.add_argument("--model", default="landscape",
                        help="a shipped label-map generator, or landscape-random (random weights: noise "
                             "pictures, real timings) (default: %(default)s)")
    editor.add_argument("--port", type=_non_negative_int, default=8000, help="port on 127.0.0.1 (default: %(default)s)")
    editor.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    editor.add_argument("--policy", choices=("exact", "sige"), default="exact",
                        help="compile policy (default: %(default)s)")
    editor.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")
    editor.set_defaults(func=_cmd_editor)

    costs = sub.add_parser(
        "costs", help="show (or measure again) the kernel costs the compiler plans with on this machine",
        description="Print the seconds per unit of work of the kernels an incremental graph runs (dense and "
                    "sparse convolution per MAC and per weight byte, gather/scatter per element, one op "
                    "call), which the partition pass weighs sparse against dense with. They are measured "
                    "once per device, dtype and thread count (about a second) and cached; --remeasure "
                    "measures again, for example after a hardware or driver change.")
    costs.add_argument("--device", default="cpu", help="torch device to measure on (default: %(default)s)")
    costs.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                       help="dtype of the measured kernels (default: %(default)s)")
    costs.add_argument("--threads", type=_positive_int, default=None,
                       help="torch CPU threads (default: torch's; costs are cached per thread count)")
    costs.add_argument("--remeasure", action="store_true", help="measure again and replace the cached figures")
    costs.add_argument("--format", choices=("text", "json"), default="text",
                       help="output format (default: %(default)s)")
    costs.add_argument("--out", metavar="PATH", help="write the output to PATH instead of stdout")
    costs.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error")
    costs.set_defaults(func=_cmd_costs)
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
    from sigec.frontends.dump import UsageError
    from sigec.passes import PassError

    debug = getattr(args, "debug", False)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("sigec: interrupted", file=sys.stderr)
        return 130
    except UsageError as exc:
        print(f"sigec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (sigec.EngineError, sigec.CaptureError, PassError, ValueError, OSError) as exc:
        if debug:
            traceback.print_exc()
        print(f"sigec: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: one line, the traceback with --debug
        if debug:
            traceback.print_exc()
        print(f"sigec: error: internal error: {type(exc).__name__}: {exc} "
              "(run again with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
