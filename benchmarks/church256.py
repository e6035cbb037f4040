"""Benchmark: DDPM LSUN-church-256 UNet, one denoising step, dense vs incremental.

For elliptical edits of each size (and an all-false mask) it prints MACs, cache memory, PSNR of
the incremental output against a dense run on the edited input and, unless ``--no-timing``,
wall-clock times. The input is N(0, 1); the edit adds N(0, 0.3^2) noise inside the mask.

    python benchmarks/church256.py                                  # full 256x256 model
    python benchmarks/church256.py --config church-small            # same structure, 64x64
    python benchmarks/church256.py --no-timing --json out/x.json    # MACs and quality only
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional


import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script or with -m

from benchmarks.common import (EditCase, benchmark_arguments, parse_fractions, parse_shapes,  # noqa: E402
                               run_edit_benchmark)
from sigec.models import UNET_CONFIGS, ddpm_unet  # noqa: E402

TIMESTEP = 500


def church_case(config: str) -> EditCase:
    res = UNET_CONFIGS[config]["sample_size"]
    x = torch.randn((1, 3, res, res), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([TIMESTEP])

    def edit(inputs: tuple, mask: torch.Tensor) -> tuple[tuple, torch.Tensor]:
        noise = 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        return (torch.where(mask, inputs[0] + noise, inputs[0]), inputs[1]), mask

    return EditCase(config, ddpm_unet(config), (x, t), edit, output=lambda out: out.sample)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = benchmark_arguments(__doc__.splitlines()[0], "out/church256.json")
    parser.add_argument("--config", default="church256", choices=["church256", "church-small"],
                        help="UNet configuration from sigec.models.UNET_CONFIGS")
    args = parser.parse_args(argv)
    fractions, shapes = parse_fractions(parser, args), parse_shapes(parser, args)
    if args.quick:
        args.config, fractions, args.repeats = "church-small", [0.05], 1
    return run_edit_benchmark(church_case(args.config), args, fractions, shapes)


if __name__ == "__main__":
    main()
