"""Benchmark: Stable Diffusion 1.x UNet step and whole SDEdit loop, dense vs incremental.

Seeded random weights (``sigec.models.sd_unet``, ``sigec.diffusion.sd_vae``), so the figures say
how fast and how close to dense the engine is, not how good a picture looks.

1. **One UNet step** at the SD 1.x configuration (64x64 latent, text embedding 1x77x768, t=500):
   dense vs incremental latency (median [min, max], timed alternately), MACs (sigec's counter) and
   PSNR against a dense run on the edited latent, for elliptical edits of 1.7%, 5% and 15% (the
   latent is N(0, 1); the edit adds N(0, 0.3^2) inside the mask) and an all-false mask.
2. **A whole SDEdit loop** (``sigec.diffusion.DiffusionEditor``, DDIM, VAE encoder and decoder
   included) on a smooth synthetic image with a painted ellipse: recording time against one plain
   dense run of the original, the incremental edited run against the dense edited run (end-to-end
   speedup), and the PSNR of the final image against the dense edited run (next to the PSNR of
   the unedited result, i.e. of recomputing nothing). Each loop is timed once.

    python benchmarks/sd_unet.py                          # SD 1.x: step table + 50-step loop
    python benchmarks/sd_unet.py --loop-steps 10          # shorter loop
    python benchmarks/sd_unet.py --no-loop --repeats 3    # the step table only
    python benchmarks/sd_unet.py --quick                  # sd-tiny, 4-step loop (tests)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional


import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script or with -m

from benchmarks.common import (DTYPES, EditCase, benchmark_arguments, parse_fractions, parse_shapes, psnr,  # noqa: E402
                               run_edit_benchmark, write_json)
from sigec.diffusion import DiffusionEditor, sd_vae  # noqa: E402
from sigec.frontends.edits import ellipse_mask  # noqa: E402
from sigec.models import SD_UNET_CONFIGS, sd_unet  # noqa: E402

TIMESTEP = 500


def text_embedding(config: str, seed: int = 0) -> torch.Tensor:
    """A seeded stand-in for CLIP's text embedding: (1, 77, cross_attention_dim), N(0, 1)."""
    dim = SD_UNET_CONFIGS[config]["cross_attention_dim"]
    return torch.randn((1, 77, dim), generator=torch.Generator().manual_seed(seed))


def step_case(config: str) -> EditCase:
    res = SD_UNET_CONFIGS[config]["sample_size"]
    x = torch.randn((1, 4, res, res), generator=torch.Generator().manual_seed(0))
    inputs = (x, torch.tensor([TIMESTEP]), text_embedding(config))

    def edit(inputs: tuple, mask: torch.Tensor) -> tuple[tuple, torch.Tensor]:
        noise = 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        return (torch.where(mask, inputs[0] + noise, inputs[0]), *inputs[1:]), mask

    return EditCase(f"{config} UNet2DConditionModel step", sd_unet(config), inputs, edit, output=lambda out: out.sample)


def synthetic_picture(size: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A smooth colour image in [-1, 1], the same with an ellipse painted in, and the ellipse's mask."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    image = torch.stack([0.8 * xs, 0.6 * ys, 0.9 * xs * ys])[None]
    mask = ellipse_mask(size, size, fraction, centre=(0.6, 0.4), aspect=1.5)
    edited = torch.where(mask, torch.tensor([0.9, -0.7, 0.2]).view(1, 3, 1, 1), image)
    return image, edited, mask


def run_loop(config: str, size: int, steps: int, strength: float, fraction: float, guidance: bool,
             cache_dtype: Optional[str]) -> dict:
    """Record, plain dense original, incremental edit and dense edit of one SDEdit loop."""
    unet, vae = sd_unet(config), sd_vae(config)
    uncond = text_embedding(config, seed=1) if guidance else None
    editor = DiffusionEditor(unet, text_embedding(config), vae=vae, uncond_embeddings=uncond, steps=steps,
                             strength=strength, cache_dtype=DTYPES[cache_dtype] if cache_dtype else None)
    image, edited, mask = synthetic_picture(size, fraction)
    start = time.perf_counter()
    editor._compile_engines(editor._check_image(image))
    compile_s = time.perf_counter() - start
    original = editor.record(image)
    record_s = editor._original["record_s"]
    _, _, plain_dense_s = editor.run_dense(image)
    result = editor.edit(edited, mask, dense=True)
    return {
        "config": config, "image_size": size, "ddim_steps": steps, "strength": strength, "steps": len(editor.steps),
        "step_indices": editor.steps, "guidance": guidance, "cache_dtype": cache_dtype or "fp32",
        "edit_fraction": float(mask.float().mean()), "compile_s": compile_s,
        "record_s": record_s, "plain_dense_s": plain_dense_s, "record_overhead": record_s / plain_dense_s,
        "edited_s": result.edited_s, "dense_edited_s": result.dense_edited_s, "speedup": result.speedup,
        "psnr_db": psnr(result.image, result.dense_image),
        "psnr_no_recompute_db": psnr(original, result.dense_image),
        "slot_bytes": result.slot_bytes, "cache_bytes": result.cache_bytes,
    }


def format_loop(loop: dict) -> str:
    mib = {k: f"{v / 2**20:.1f}" for k, v in loop["slot_bytes"].items()}
    return (f"SDEdit loop ({loop['config']}, {loop['image_size']}x{loop['image_size']} image, {loop['steps']} of "
            f"{loop['ddim_steps']} DDIM steps, {loop['edit_fraction']:.1%} edit, "
            f"{'CFG batch 2' if loop['guidance'] else 'no CFG'}, {loop['cache_dtype']} cache):\n"
            f"  plain dense run of the original {loop['plain_dense_s']:.2f} s; recording {loop['record_s']:.2f} s "
            f"({loop['record_overhead']:.2f}x)\n"
            f"  edited: dense {loop['dense_edited_s']:.2f} s, incremental {loop['edited_s']:.2f} s "
            f"({loop['speedup']:.2f}x end to end)\n"
            f"  final image PSNR vs dense edited run {loop['psnr_db']:.1f} dB (recompute nothing: "
            f"{loop['psnr_no_recompute_db']:.1f} dB); cache per slot MiB {mib}")


def main(argv: Optional[list[str]] = None) -> dict:
    parser = benchmark_arguments(__doc__.splitlines()[0], "out/sd_unet.json")
    parser.set_defaults(fractions="0.017,0.05,0.15", repeats=3)
    parser.add_argument("--config", default="sd1", choices=sorted(SD_UNET_CONFIGS),
                        help="UNet (and VAE) configuration: sd1 is Stable Diffusion 1.x")
    parser.add_argument("--no-loop", action="store_true", help="skip the whole SDEdit loop")
    parser.add_argument("--loop-steps", type=int, default=50, help="DDIM steps of the loop's schedule")
    parser.add_argument("--strength", type=float, default=0.8, help="SDEdit strength: the share of the steps run")
    parser.add_argument("--loop-fraction", type=float, default=0.017, help="edit area of the loop's painted ellipse")
    parser.add_argument("--cfg", action="store_true", help="classifier-free guidance in the loop (UNet batch 2)")
    parser.add_argument("--cache-dtype", default="fp16", choices=list(DTYPES), help="the loop's cache storage dtype")
    args = parser.parse_args(argv)
    fractions, shapes = parse_fractions(parser, args), parse_shapes(parser, args)
    if args.quick:
        args.config, args.repeats, args.loop_steps, args.strength = "sd-tiny", 1, 4, 0.5
    if args.loop_steps < 1 or not 0 < args.strength <= 1 or not 0 < args.loop_fraction <= 1:
        parser.error("--loop-steps must be at least 1, --strength and --loop-fraction in (0, 1]")
    result = run_edit_benchmark(step_case(args.config), args, fractions, shapes)
    result["config"] = args.config
    if not args.no_loop:
        size = 8 * SD_UNET_CONFIGS[args.config]["sample_size"]
        result["loop"] = run_loop(args.config, size, args.loop_steps, args.strength, args.loop_fraction, args.cfg,
                                  args.cache_dtype)
        print(format_loop(result["loop"]))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
