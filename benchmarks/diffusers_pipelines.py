"""Benchmark: ``sigec.diffusion.incremental(pipe)`` on diffusers pipelines, against the plain pipeline.

Pipelines are built from configurations with seeded random weights
(``sigec.diffusion.random_pipelines``), called with ``prompt_embeds`` (no text encoder). Cases:

* ``img2img``: ``StableDiffusionImg2ImgPipeline``, the whole call (encode, ``strength`` of
  ``--steps`` DDIM steps, decode): the plain call, the recording call, and the edited call of an
  ellipse edit of ``--fraction`` of the image; PSNR of the edit against the plain call on the edited
  image, and the UNet step's MAC ratio and efficiency (speed-up / MAC ratio).
* ``controlnet``: ``StableDiffusionControlNetPipeline``, one step (ControlNet and UNet, latent
  output) after an edit of ``--fraction`` of the control image (a scribble; ``--control-edit``: a
  filled ellipse, as a segmentation map's edit, or one more stroke): timed alternately with the
  plain step, PSNR of the UNet's noise prediction against it.
* ``sdxl``: one step of the SDXL UNet (``added_cond_kwargs``) at an ellipse edit, engine against the
  plain UNet, alternately.

    python benchmarks/diffusers_pipelines.py --case img2img --unet sd1 --vae sd1 --size 512 --steps 50
    python benchmarks/diffusers_pipelines.py --case controlnet --unet sd1 --vae sd1 --size 512
    python benchmarks/diffusers_pipelines.py --case sdxl --unet sdxl --size 512
    python benchmarks/diffusers_pipelines.py --quick            # every case, tiny models (tests)

Guidance is off by default (``--guidance 1``: batch 1, half the time of a benchmark whose dense
calls take minutes); ``--guidance 7.5`` runs classifier-free guidance (batch 2) in both.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

# Busy-waiting OpenMP threads make 2-thread timings on a shared machine jump by an order of
# magnitude; must be set before torch loads its OpenMP runtime. An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script or with -m

import sigec  # noqa: E402
from benchmarks.common import ellipse_mask, psnr, time_interleaved, write_json  # noqa: E402
from sigec.diffusion.pipelines import incremental  # noqa: E402
from sigec.diffusion.random_pipelines import prompt_embeddings, sd_pipeline  # noqa: E402
from sigec.frontends.edits import brush_stroke_mask  # noqa: E402
from sigec.models import SDXL_POOLED_DIM, sd_unet  # noqa: E402

CASES = ("img2img", "controlnet", "sdxl")


def picture(size: int, seed: int = 0) -> torch.Tensor:
    """A smooth seeded picture in [-1, 1] (low-resolution noise, upsampled): something to edit."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, size // 32), max(2, size // 32), generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1) * 2 - 1


def scribble(size: int, strokes: int = 6, seed: int = 0) -> torch.Tensor:
    """A seeded scribble: white strokes on black, ``(1, 3, size, size)`` in [0, 1] (a ControlNet's input)."""
    g = torch.Generator().manual_seed(seed)
    lines = torch.zeros(size, size, dtype=torch.bool)
    for _ in range(strokes):
        points = [(x * size, y * size) for x, y in torch.rand(4, 2, generator=g).tolist()]
        lines |= brush_stroke_mask(points, max(1.0, size / 128), size, size)
    return lines.float()[None, None].expand(1, 3, size, size).clone()


def _latent_mask(mask: torch.Tensor, latent: int) -> torch.Tensor:
    return F.adaptive_max_pool2d(mask[None, None].float(), latent)[0, 0] > 0


def _mac_ratio(engine, mask: torch.Tensor) -> float:
    report = engine.report(mask)
    return report.dense_macs / max(report.incremental_macs or 1, 1)


def _row(name: str, dense: tuple, inc: tuple, quality: float, mac_ratio: float, **extra) -> dict:
    speedup = dense[0] / inc[0]
    return {"case": name, "dense_s": dense, "incremental_s": inc, "speedup": speedup, "psnr_db": quality,
            "mac_ratio": mac_ratio, "efficiency": speedup / mac_ratio, **extra}


def _recorded(pipe, args, image: torch.Tensor, kw: dict):
    """``(incremental pipeline, seeded generator factory, recording seconds, compile seconds)`` after
    recording ``image``; recording seconds exclude compiling."""
    gen = lambda: torch.Generator().manual_seed(args.seed)  # noqa: E731  the same seed on every call
    inc = incremental(pipe, policy=args.policy)
    start = time.perf_counter()
    inc(image=image, generator=gen(), **kw)
    compile_s = sum(m.compile_s for m in inc.models.values())
    return inc, gen, time.perf_counter() - start - compile_s, compile_s


def bench_img2img(args) -> dict:
    pipe = sd_pipeline("img2img", unet=args.unet, vae=args.vae)
    pipe.set_progress_bar_config(disable=True)
    image = picture(args.size)
    mask = ellipse_mask(args.size, args.size, args.fraction)
    edited = torch.where(mask, torch.tensor([0.9, -0.2, -0.6])[:, None, None], image)
    kw = dict(strength=args.strength, num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="pt",
              **prompt_embeddings(pipe.unet))
    inc, gen, record_s, compile_s = _recorded(pipe, args, image, kw)
    timings = {"dense": [], "incremental": []}
    out = dense = None
    for _ in range(args.repeats):  # whole calls, alternately
        start = time.perf_counter()
        dense = pipe(image=edited, generator=gen(), **kw).images
        timings["dense"].append(time.perf_counter() - start)
        start = time.perf_counter()
        out = inc(image=edited, generator=gen(), **kw).images
        timings["incremental"].append(time.perf_counter() - start)
    unet = next(iter(inc.models["unet"].engines.values()))
    latent = unet.context.input_resolution[0]
    steps = inc.last.engine_calls["unet"]
    med = lambda s: (sorted(s)[len(s) // 2], min(s), max(s))  # noqa: E731
    return _row("img2img", med(timings["dense"]), med(timings["incremental"]), psnr(out, dense),
                _mac_ratio(unet, _latent_mask(mask, latent)), steps=steps, record_s=record_s,
                compile_s=compile_s, edited_fraction=inc.last.edited_fraction)


def bench_controlnet(args) -> dict:
    pipe = sd_pipeline("controlnet", unet=args.unet, vae=args.vae)
    pipe.set_progress_bar_config(disable=True)
    control = scribble(args.size)
    if args.control_edit == "region":  # a filled region, as a segmentation or depth map's edit
        edit = ellipse_mask(args.size, args.size, args.fraction)
    else:  # one more stroke, as wide as makes it cover --fraction of the image
        path = [(x * args.size, y * args.size) for x, y in ((0.62, 0.3), (0.55, 0.45), (0.6, 0.62))]
        radius = 1.0
        while float(brush_stroke_mask(path, radius, args.size, args.size).float().mean()) < args.fraction:
            radius += 0.5
        edit = brush_stroke_mask(path, radius, args.size, args.size)
    edited = torch.where(edit, 1.0, control)
    kw = dict(num_inference_steps=1, guidance_scale=args.guidance, output_type="latent", height=args.size,
              width=args.size, **prompt_embeddings(pipe.unet))
    inc, gen, record_s, compile_s = _recorded(pipe, args, control, kw)
    # the step's noise prediction, which the PSNR compares (one step from pure noise barely moves the
    # latents, so theirs would flatter): a forward hook sees the UNet's output in both pipelines
    predictions = []
    hook = pipe.unet.register_forward_hook(lambda module, inputs, output: predictions.append(output[0]))
    results = {}
    (dense_t, inc_t) = time_interleaved(lambda: results.__setitem__("dense", pipe(image=edited, generator=gen(), **kw).images),
                                        lambda: results.__setitem__("inc", inc(image=edited, generator=gen(), **kw).images),
                                        args.repeats)
    hook.remove()
    dense_eps, inc_eps = predictions[-2], predictions[-1]
    controlnet = next(iter(inc.models["controlnet"].engines.values()))
    unet = next(iter(inc.models["unet"].engines.values()))
    pixel_mask = inc.last.mask
    latent_mask = _latent_mask(pixel_mask, unet.context.input_resolution[0])
    c_rep, u_rep = controlnet.report(pixel_mask), unet.report(latent_mask)
    macs = (c_rep.dense_macs + u_rep.dense_macs) / max((c_rep.incremental_macs or 0) + (u_rep.incremental_macs or 0), 1)
    return _row("controlnet step", dense_t, inc_t, psnr(inc_eps, dense_eps), macs,
                psnr_latents_db=psnr(results["inc"], results["dense"]),
                edited_fraction=inc.last.edited_fraction, record_s=record_s, compile_s=compile_s,
                mac_ratio_controlnet=c_rep.dense_macs / max(c_rep.incremental_macs or 1, 1),
                mac_ratio_unet=u_rep.dense_macs / max(u_rep.incremental_macs or 1, 1),
                latent_fraction=float(latent_mask.float().mean()))


def bench_sdxl(args) -> dict:
    unet = sd_unet(args.unet if args.unet.startswith("sdxl") else "sdxl-tiny")
    latent = args.size // 8
    emb = prompt_embeddings(unet, pooled_dim=SDXL_POOLED_DIM[args.unet if args.unet.startswith("sdxl") else "sdxl-tiny"])
    batch = 2 if args.guidance > 1 else 1
    x = torch.randn(batch, 4, latent, latent, generator=torch.Generator().manual_seed(args.seed))
    t = torch.tensor([500] * batch)
    cond = {"encoder_hidden_states": emb["prompt_embeds"].expand(batch, -1, -1),
            "added_cond_kwargs": {"text_embeds": emb["pooled_prompt_embeds"].expand(batch, -1),
                                  "time_ids": torch.tensor([[args.size, args.size, 0, 0, args.size, args.size]] * batch,
                                                           dtype=torch.float32)}}
    start = time.perf_counter()
    engine = sigec.compile(unet, (x, t), cond, policy=args.policy)
    compile_s = time.perf_counter() - start
    engine(x, t, **cond)
    mask = ellipse_mask(latent, latent, args.fraction)
    edited = torch.where(mask, x + 1.0, x)
    results = {}
    dense_t, inc_t = time_interleaved(lambda: results.__setitem__("dense", unet(edited, t, **cond).sample),
                                      lambda: results.__setitem__("inc", engine(edited, t, mask=mask, **cond).sample),
                                      args.repeats)
    return _row("sdxl unet step", dense_t, inc_t, psnr(results["inc"], results["dense"]), _mac_ratio(engine, mask),
                compile_s=compile_s, edited_fraction=float(mask.float().mean()))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=CASES, action="append", help="repeatable; default: every case")
    parser.add_argument("--unet", default="sd-tiny", help="sigec.models.sd_unet configuration (sd1, sdxl, ...)")
    parser.add_argument("--vae", default="sd-tiny", help="sigec.diffusion.sd_vae configuration (sd1, sd-tiny)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (the latent is 1/8)")
    parser.add_argument("--steps", type=int, default=50, help="img2img: steps of the full schedule")
    parser.add_argument("--strength", type=float, default=0.8, help="img2img: fraction of the steps run")
    parser.add_argument("--fraction", type=float, default=0.017, help="edited fraction of the image")
    parser.add_argument("--guidance", type=float, default=1.0, help="guidance scale (above 1: batch 2)")
    parser.add_argument("--policy", default="sige", choices=("sige", "exact"))
    parser.add_argument("--control-edit", default="region", choices=("region", "stroke"),
                        help="controlnet: the control image's edit, a filled ellipse or a scribbled stroke")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny models, few steps: every code path in seconds")
    parser.add_argument("--json", default="benchmarks/results/diffusers_pipelines.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.unet, args.vae, args.size, args.steps, args.repeats = "sd-tiny", "sd-tiny", 128, 5, 1
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for case in args.case or CASES:
        row = {"img2img": bench_img2img, "controlnet": bench_controlnet, "sdxl": bench_sdxl}[case](args)
        rows.append(row)
        d, i = row["dense_s"], row["incremental_s"]
        print(f"{row['case']:>16}: dense {d[0]:.3f} s [{d[1]:.3f}, {d[2]:.3f}], incremental {i[0]:.3f} s "
              f"[{i[1]:.3f}, {i[2]:.3f}] -> {row['speedup']:.2f}x; {row['mac_ratio']:.1f}x fewer MACs, efficiency "
              f"{row['efficiency']:.2f}; PSNR {row['psnr_db']:.1f} dB vs dense; edit {row['edited_fraction']:.2%}",
              flush=True)
        if "mac_ratio_unet" in row:
            print(f"{'':>18}MAC ratios: ControlNet {row['mac_ratio_controlnet']:.1f}x, UNet {row['mac_ratio_unet']:.1f}x "
                  f"(latent mask {row['latent_fraction']:.2%})", flush=True)
    result = {"args": vars(args), "threads": args.threads, "rows": rows}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
