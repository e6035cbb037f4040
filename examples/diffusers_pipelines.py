"""Edit through diffusers pipelines with ``sigec.diffusion.incremental``: img2img and ControlNet scribbles.

The pipelines are ``StableDiffusionImg2ImgPipeline`` and ``StableDiffusionControlNetPipeline``
built from configurations with seeded random weights (nothing is downloaded; ``prompt_embeds``
stand in for a text encoder), so the pictures are the textures of random networks, not photos.
What matters is that the incremental pipeline is called exactly like the pipeline:

    inc = sigec.diffusion.incremental(pipe)
    inc(image=picture, generator=torch.Generator().manual_seed(0), **settings)   # records
    inc(image=edited, generator=torch.Generator().manual_seed(0), **settings)    # recomputes the edit

For each pipeline it prints the plain call's time on the edited input, the incremental call's, and
writes ``diffusers-img2img.png`` and ``diffusers-controlnet.png``: the input, the edited input, the
dense and incremental results and their difference.

    python examples/diffusers_pipelines.py                              # small models, in about a minute
    python examples/diffusers_pipelines.py --unet sd1 --vae sd1 --size 512 --steps 50   # SD 1.x sizes
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sigec  # noqa: E402
from sigec.diffusion.random_pipelines import prompt_embeddings, sd_pipeline  # noqa: E402
from sigec.frontends.edits import brush_stroke_mask, ellipse_mask  # noqa: E402


def _pixels(image: torch.Tensor, signed: bool) -> Image.Image:
    """A ``(1, 3, H, W)`` tensor as a PIL image (``signed``: values in [-1, 1], else [0, 1])."""
    x = (image[0].float() + 1) / 2 if signed else image[0].float()
    return Image.fromarray((x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


def _strip(images: list[Image.Image], path: str) -> None:
    w, h = images[0].size
    sheet = Image.new("RGB", (w * len(images), h), "white")
    for i, im in enumerate(images):
        sheet.paste(im.convert("RGB"), (i * w, 0))
    sheet.save(path)
    print(f"  wrote {path} (input, edited input, dense, incremental, difference x10)")


def _run(name: str, pipe, image, edited, kwargs: dict, signed_input: bool, out: str) -> None:
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731  the same seed on every call
    inc = sigec.diffusion.incremental(pipe)
    start = time.perf_counter()
    inc(image=image, generator=gen(), **kwargs)
    print(f"{name}: recorded in {time.perf_counter() - start:.1f} s (compiling included)")
    start = time.perf_counter()
    dense = pipe(image=edited, generator=gen(), **kwargs).images
    dense_s = time.perf_counter() - start
    start = time.perf_counter()
    result = inc(image=edited, generator=gen(), **kwargs).images
    inc_s = time.perf_counter() - start
    err = (result - dense).abs()
    print(f"  edit of {inc.last.edited_fraction:.1%} of the image: plain pipeline {dense_s:.2f} s, incremental "
          f"{inc_s:.2f} s ({dense_s / inc_s:.1f}x); largest difference {float(err.max()):.3g}")
    _strip([_pixels(image, signed_input), _pixels(edited, signed_input), _pixels(dense, False),
            _pixels(result, False), _pixels((err * 10).clamp(0, 1), False)], out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", default="sd-tiny")
    parser.add_argument("--vae", default="sd-tiny")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = args.size

    # img2img: a smooth picture, an ellipse repainted
    pipe = sd_pipeline("img2img", unet=args.unet, vae=args.vae)
    pipe.set_progress_bar_config(disable=True)
    coarse = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    picture = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1) * 2 - 1
    region = ellipse_mask(size, size, 0.02, centre=(0.6, 0.4), aspect=1.5)
    edited = torch.where(region, torch.tensor([0.9, -0.3, -0.6])[:, None, None], picture)
    settings = dict(strength=0.8, num_inference_steps=args.steps, guidance_scale=7.5, output_type="pt",
                    **prompt_embeddings(pipe.unet))
    _run("img2img", pipe, picture, edited, settings, True, "diffusers-img2img.png")

    # ControlNet: a scribble, one more stroke
    pipe = sd_pipeline("controlnet", unet=args.unet, vae=args.vae)
    pipe.set_progress_bar_config(disable=True)
    lines = torch.zeros(size, size, dtype=torch.bool)
    for points in ([(0.1, 0.2), (0.5, 0.35), (0.9, 0.2)], [(0.2, 0.9), (0.35, 0.5), (0.3, 0.1)],
                   [(0.6, 0.9), (0.75, 0.6), (0.95, 0.7)]):
        lines |= brush_stroke_mask([(x * size, y * size) for x, y in points], size / 100, size, size)
    stroke = brush_stroke_mask([(0.45 * size, 0.55 * size), (0.6 * size, 0.7 * size)], size / 40, size, size)
    scribble = lines.float()[None, None].expand(1, 3, size, size).clone()
    edited = torch.where(stroke, 1.0, scribble)
    settings = dict(num_inference_steps=args.steps, guidance_scale=7.5, output_type="pt", height=size, width=size,
                    **prompt_embeddings(pipe.unet))
    _run("controlnet", pipe, scribble, edited, settings, False, "diffusers-controlnet.png")


if __name__ == "__main__":
    main()
