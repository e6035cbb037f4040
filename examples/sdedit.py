"""SDEdit with Stable Diffusion's UNet and VAE, dense vs incremental (sigec.diffusion).

The models have SEEDED RANDOM WEIGHTS (no weights can be downloaded here) and the text
embeddings are random tensors, so the results are not meaningful pictures: the example shows the
workflow and measures it. The incremental result should match the dense one closely (see the
difference image); both are noise-like.

It paints a mask into an image (scikit-image's astronaut by default, an image file with --image,
or a generated picture with --synthetic), records the SDEdit trajectory of the original (one
cache slot per step), then runs the edited image incrementally and densely, and writes under
--out: original.png, edited_input.png, original_result.png, dense.png, incremental.png and
difference.png (|incremental - dense|, stretched so the largest difference is white). It prints
the end-to-end times.

    python examples/sdedit.py                                        # sd-tiny, 128x128, quick
    python examples/sdedit.py --config sd1 --size 512 --steps 50     # SD 1.x (slow on a CPU)
    python examples/sdedit.py --image photo.png --mask mask.png
    python examples/sdedit.py --mask rect:0.4,0.3,0.6,0.5 --colour 255,40,40
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: no busy-waiting threads

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sigec.diffusion import DiffusionEditor, image_tensor, sd_vae  # noqa: E402
from sigec.frontends.measure import psnr  # noqa: E402
from sigec.models import SD_UNET_CONFIGS, sd_unet  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_picture(path: Optional[str], synthetic: bool, size: int) -> tuple[Image.Image, str]:
    """The image to edit, centre-cropped to a square and resized to ``size``, and where it came from."""
    if path is not None:
        picture, source = Image.open(path).convert("RGB"), path
    elif not synthetic:
        try:
            from skimage import data
            picture, source = Image.fromarray(data.astronaut()), "skimage.data.astronaut()"
        except ImportError:
            synthetic = True
            print("scikit-image is not installed (pip install scikit-image): using a generated picture")
    if path is None and synthetic:
        ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
        rgb = np.stack([xs, ys, 0.5 + 0.5 * np.sin(6 * xs) * np.cos(4 * ys)], axis=-1)
        picture, source = Image.fromarray((rgb * 255).astype(np.uint8)), "a generated gradient"
    side = min(picture.size)
    left, top = (picture.width - side) // 2, (picture.height - side) // 2
    return picture.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC), source


def paint_mask(spec: str, size: int) -> Image.Image:
    """``ellipse:cx,cy,rx,ry`` or ``rect:x0,y0,x1,y1`` (fractions of the side), or a mask image file."""
    kind, _, numbers = spec.partition(":")
    if kind in ("ellipse", "rect"):
        try:
            a, b, c, d = (float(v) * size for v in numbers.split(","))
        except ValueError:
            raise SystemExit(f"--mask {spec!r}: expected {kind}:four comma-separated fractions of the image side")
        mask = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(mask)
        if kind == "ellipse":
            draw.ellipse((a - c, b - d, a + c, b + d), fill=255)
        else:
            draw.rectangle((a, b, c, d), fill=255)
        return mask
    if not Path(spec).exists():
        raise SystemExit(f"--mask {spec!r}: not an ellipse:/rect: spec and no such file")
    return Image.open(spec).convert("L").resize((size, size), Image.NEAREST)


def to_png(image: torch.Tensor, path: Path) -> None:
    arr = ((image[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(arr).save(path)


def difference_png(a: torch.Tensor, b: torch.Tensor, path: Path) -> float:
    diff = (a - b).abs().amax(dim=1)[0]
    top = float(diff.max())
    scaled = (diff / top * 255).round() if top > 0 else diff
    Image.fromarray(scaled.to(torch.uint8).numpy()).save(path)
    return top


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Models have seeded random weights: the "
                                "images are not meaningful pictures, the example shows the workflow and its speed.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="sd-tiny", choices=sorted(SD_UNET_CONFIGS),
                   help="UNet and VAE configuration: sd1 is Stable Diffusion 1.x, sd-tiny its structure with few channels")
    p.add_argument("--size", type=int, default=None, help="image side in pixels, a multiple of 8 (default: 512 for sd1, "
                   "128 for sd-tiny)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the full schedule")
    p.add_argument("--strength", type=float, default=0.8, help="SDEdit strength: the share of the steps that run")
    p.add_argument("--image", default=None, help="image file to edit (default: scikit-image's astronaut)")
    p.add_argument("--synthetic", action="store_true", help="edit a generated picture (no file, no scikit-image)")
    p.add_argument("--mask", default="ellipse:0.62,0.38,0.09,0.07",
                   help="the painted region: ellipse:cx,cy,rx,ry or rect:x0,y0,x1,y1 (fractions), or a mask PNG (white = edit)")
    p.add_argument("--colour", default="230,60,40", help="the paint colour, r,g,b in 0-255")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (0: no guidance, batch 1)")
    p.add_argument("--cache-dtype", default="fp16", choices=list(DTYPES), help="storage dtype of the caches")
    p.add_argument("--budget-mib", type=float, default=None, help="UNet cache budget (least recently used slots evicted)")
    p.add_argument("--offload", action="store_true", help="keep the cache slots on the host between uses")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--out", default="out/sdedit", help="folder for the PNGs")
    args = p.parse_args(argv)
    size = args.size or (512 if args.config == "sd1" else 128)
    if size % 8 or size < 8:
        p.error(f"--size must be a positive multiple of 8 (the VAE down-samples by 8), got {size}")
    try:
        colour = torch.tensor([float(c) for c in args.colour.split(",")]) / 127.5 - 1
        assert colour.numel() == 3
    except (ValueError, AssertionError):
        p.error(f"--colour must be r,g,b in 0-255, got {args.colour!r}")
    torch.set_num_threads(args.threads)

    picture, source = load_picture(args.image, args.synthetic, size)
    mask = torch.from_numpy(np.asarray(paint_mask(args.mask, size)) > 127)
    if not mask.any():
        p.error(f"--mask {args.mask!r} covers no pixel of the {size}x{size} image")
    image = image_tensor(picture)
    edited = torch.where(mask, colour.view(1, 3, 1, 1), image)

    unet, vae = sd_unet(args.config, seed=args.seed), sd_vae(args.config, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    dim = unet.config.cross_attention_dim
    text, uncond = torch.randn(1, 77, dim, generator=g), torch.randn(1, 77, dim, generator=g)
    editor = DiffusionEditor(unet, text, vae=vae, uncond_embeddings=uncond if args.guidance > 0 else None,
                             guidance_scale=args.guidance, steps=args.steps, strength=args.strength, seed=args.seed,
                             cache_dtype=DTYPES[args.cache_dtype], offload="cpu" if args.offload else None,
                             cache_budget_bytes=int(args.budget_mib * 2**20) if args.budget_mib else None)
    print(f"{args.config}: {source}, {size}x{size}, mask {float(mask.float().mean()):.1%} of the image, "
          f"{len(editor.steps)} of {args.steps} DDIM steps, guidance {args.guidance}, {args.cache_dtype} cache, "
          f"{args.threads} thread(s)", flush=True)
    original_result = editor.record(image)
    result = editor.edit(edited, mask, dense=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, tensor in (("original", image), ("edited_input", edited), ("original_result", original_result),
                         ("dense", result.dense_image), ("incremental", result.image)):
        to_png(tensor, out / f"{name}.png")
    top = difference_png(result.image, result.dense_image, out / "difference.png")
    print(f"compile: " + ", ".join(f"{k} {v:.1f} s" for k, v in editor.compile_s.items()))
    print(f"record (original, dense, fills {len(editor.steps)} UNet slots): {result.record_s:.2f} s")
    print(f"edit, dense:       {result.dense_edited_s:.2f} s")
    print(f"edit, incremental: {result.edited_s:.2f} s  ({result.speedup:.2f}x)")
    print(f"incremental vs dense: PSNR {psnr(result.image, result.dense_image):.1f} dB, max |diff| {top:.3g}")
    print("cache per slot: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in result.slot_bytes.items()))
    print(f"wrote {out}/{{original,edited_input,original_result,dense,incremental,difference}}.png")
    return {"result": result, "out": out}


if __name__ == "__main__":
    main()
