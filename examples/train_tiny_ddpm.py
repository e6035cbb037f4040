"""Train the tiny DDPM that ships with sigec (``sigec.models.load("digits-ddpm")``).

A diffusers ``UNet2DModel`` (epsilon prediction, about 1.1 M parameters) learns scikit-learn's
bundled digits: 1,797 images of 8x8, upscaled to 16x16 with nearest (so downsampling by 2x2
averages gives the data back), scaled to [-1, 1] with ink bright. Training noise and timesteps
come from diffusers' ``DDPMScheduler`` (cosine schedule, 1,000 steps); the shipped weights are an
exponential moving average of the trained ones. Everything is seeded: the weights' initialisation,
the data order, the noise and the timesteps, so a run with the same seed and thread count repeats.

    pip install scikit-learn                        # the data and the classifier (the "test" extra has it)
    python examples/train_tiny_ddpm.py              # ~10 min on 2 idle CPU threads; writes sigec/models/weights/
    python examples/train_tiny_ddpm.py --check      # train again into a temporary folder and compare the
                                                    # final loss with the shipped model's (within 10%)
    python examples/train_tiny_ddpm.py --score-only # score the shipped weights (below) without training

It writes ``<name>.safetensors`` and ``<name>.json`` (UNet and scheduler configurations, SHA-256
of the weights, final loss, training settings, scores) into ``--out-dir``, and the loss curve as
a PNG (``--plot``).

**Score.** The recognisability check of the issue: a logistic regression trained on the digits
(pixels scaled to [0, 1]) labels DDIM samples, downsampled to 8x8 and scaled the same way; the
score is the fraction it labels with a probability of at least 0.8. The data's own images reach
87% this way and N(0, 1) noise 18.5% (both measured by this script and recorded in the JSON).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

# Busy-waiting OpenMP threads turn contention on a shared machine into large slowdowns; must be
# set before torch loads its OpenMP runtime. A user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))   # examples/training_common.py
from training_common import (add_mode_options, check_reproduction, draw_loss_curve, final_loss,  # noqa: E402
                             optimizer_step, save_model, training_parser)

REPO = Path(__file__).resolve().parent.parent
NAME = "digits-ddpm"
RESOLUTION = 16
CONFIDENCE = 0.8          # the bar: a sample counts when the classifier is this sure
SCORE_SAMPLES = 200
SCORE_DDIM_STEPS = 50
LOSS_WINDOW = 100         # the recorded final loss: mean training loss of the last this many steps

#: the UNet: three levels (16, 8, 4 px), attention at 8x8 and in the middle block
UNET_CONFIG = dict(
    sample_size=RESOLUTION, in_channels=1, out_channels=1, layers_per_block=1,
    block_out_channels=[32, 64, 64], norm_num_groups=8,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                        prediction_type="epsilon", clip_sample=True)


def load_digits_images(resolution: int = RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as ``(1797, 1, resolution, resolution)`` floats in [-1, 1] (nearest
    upscaling), and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0   # 0..16 -> -1..1
    images = F.interpolate(images, size=(resolution, resolution), mode="nearest")
    return images, torch.tensor(digits.target)


def to_classifier_features(images: torch.Tensor) -> "numpy.ndarray":  # noqa: F821
    """``(N, 1, 16, 16)`` images in [-1, 1] -> ``(N, 64)`` 8x8 pixels in [0, 1] (the data's 0..16 / 16)."""
    small = F.adaptive_avg_pool2d(images.float(), 8)
    return ((small + 1.0) / 2.0).clamp(0.0, 1.0).reshape(len(images), 64).numpy()


def digit_classifier():
    """Logistic regression on the digits, pixels scaled to [0, 1] (scikit-learn's defaults, C=1).

    Scaled rather than raw 0..16 pixels: on raw pixels the same classifier is at least 80% sure
    of most pure-noise images, so confidence would not tell digits from noise.
    """
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    return LogisticRegression(max_iter=5000).fit(digits.data / 16.0, digits.target)


def confident_fraction(classifier, images: torch.Tensor, confidence: float = CONFIDENCE) -> float:
    """Fraction of ``images`` the classifier labels with probability >= ``confidence``."""
    proba = classifier.predict_proba(to_classifier_features(images))
    return float((proba.max(axis=1) >= confidence).mean())


def build_unet(seed: int):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**UNET_CONFIG)


@torch.no_grad()
def evaluation_loss(model, images: torch.Tensor, scheduler, seed: int, count: int = 512) -> float:
    """Noise-prediction MSE on a fixed draw of images, timesteps and noise (lower is better)."""
    g = torch.Generator().manual_seed(seed + 12345)
    idx = torch.randperm(len(images), generator=g)[:count]
    x0 = images[idx]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    pred = model(scheduler.add_noise(x0, noise, t), t).sample
    return float(F.mse_loss(pred, noise))


def train(args: argparse.Namespace) -> dict:
    """Train; returns the EMA model, the per-step losses and the run's timing."""
    from diffusers import DDPMScheduler

    torch.set_num_threads(args.threads)
    images, _ = load_digits_images()
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    model = build_unet(args.seed).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)   # data order, timesteps and noise
    order, cursor = torch.randperm(len(images), generator=g), 0
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="training", unit="step", dynamic_ncols=True)
    for step in bar:
        if cursor + args.batch_size > len(order):   # a new epoch: a new seeded permutation
            order, cursor = torch.randperm(len(images), generator=g), 0
        x0 = images[order[cursor:cursor + args.batch_size]]
        cursor += args.batch_size
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        loss = F.mse_loss(model(scheduler.add_noise(x0, noise, t), t).sample, noise)
        optimizer_step(model, ema, optimizer, loss, step, args)
        losses.append(float(loss.detach()))
        if step % 20 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-LOSS_WINDOW:]) / len(losses[-LOSS_WINDOW:]):.4f}")
    seconds = time.perf_counter() - start
    return {"ema": ema, "losses": losses, "seconds": seconds, "images": images, "scheduler": scheduler}


# ---------------------------------------------------------------------------------------------
# saving and scoring

@torch.no_grad()
def sample_digits(model, scheduler_config: dict, count: int, steps: int, seed: int) -> torch.Tensor:
    """``count`` DDIM samples in one batched call per step, seeded."""
    from sigec.frontends.demo import ddim_sample, ddim_scheduler, unet_denoiser

    noise = torch.randn((count, 1, RESOLUTION, RESOLUTION), generator=torch.Generator().manual_seed(seed))
    return ddim_sample(unet_denoiser(model), ddim_scheduler(scheduler_config, steps), noise)


def score(model, scheduler_config: dict, seed: int) -> dict:
    """The recognisability score and its two references (the data itself, and noise)."""
    classifier = digit_classifier()
    images, _ = load_digits_images()
    samples = sample_digits(model, scheduler_config, SCORE_SAMPLES, SCORE_DDIM_STEPS, seed)
    noise = torch.randn((SCORE_SAMPLES, 1, RESOLUTION, RESOLUTION), generator=torch.Generator().manual_seed(seed + 1))
    labels = classifier.predict(to_classifier_features(samples))
    return {"samples": SCORE_SAMPLES, "ddim_steps": SCORE_DDIM_STEPS, "seed": seed, "confidence": CONFIDENCE,
            "confident_fraction": confident_fraction(classifier, samples),
            "label_counts": [int((labels == d).sum()) for d in range(10)],
            "dataset_reference": confident_fraction(classifier, images),
            "noise_reference": confident_fraction(classifier, noise)}


def class_means(images: torch.Tensor, labels: torch.Tensor) -> list[list[float]]:
    """Mean 8x8 image of each digit in [0, 1] (the demo's nearest-mean labeller needs no scikit-learn)."""
    feats = torch.tensor(to_classifier_features(images))
    return [[round(v, 5) for v in feats[labels == d].mean(dim=0).tolist()] for d in range(10)]


def run(args: argparse.Namespace, out_dir: Path, plot: Optional[Path]) -> dict:
    """Train, save the weights and the manifest into ``out_dir``, score, draw the loss curve."""
    import diffusers

    result = train(args)
    losses, ema = result["losses"], result["ema"]
    loss = final_loss(losses, LOSS_WINDOW)
    images, labels = load_digits_images()
    scheduler_config = {k: v for k, v in result["scheduler"].config.items() if not k.startswith("_")}
    manifest = {
        "model_class": "UNet2DModel", "model_config": UNET_CONFIG, "scheduler_config": scheduler_config,
        "parameters": sum(p.numel() for p in ema.parameters()),
        "data": {"source": "sklearn.datasets.load_digits", "images": len(images), "resolution": RESOLUTION,
                 "upscale": "nearest", "range": [-1.0, 1.0], "ink": "bright"},
        "final_loss": loss, "final_loss_window": LOSS_WINDOW,
        "eval_loss_ema": evaluation_loss(ema, images, result["scheduler"], args.seed),
        "training": {"seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                     "warmup": args.warmup, "ema_decay": args.ema_decay, "threads": args.threads,
                     "seconds": round(result["seconds"], 1), "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "python": platform.python_version()},
        "class_means_8x8": class_means(images, labels),
    }
    if not args.no_score:
        manifest["score"] = score(ema, scheduler_config, args.seed)
    manifest = save_model(ema, out_dir, NAME, manifest)
    if plot is not None:
        draw_loss_curve(losses, plot, f"{NAME}: {args.steps} steps, batch {args.batch_size}, "
                                      f"final loss {loss:.4f} (mean of last {LOSS_WINDOW})", LOSS_WINDOW)
    print(f"trained {args.steps} steps in {result['seconds'] / 60:.1f} min ({args.threads} threads); "
          f"final loss {loss:.4f}; weights {manifest['size_bytes']:,} bytes -> {out_dir}")
    if "score" in manifest:
        s = manifest["score"]
        print(f"score: {s['confident_fraction']:.1%} of {s['samples']} samples labelled with p >= {CONFIDENCE} "
              f"(data {s['dataset_reference']:.1%}, noise {s['noise_reference']:.1%}); labels {s['label_counts']}")
    return manifest


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = training_parser(__doc__.splitlines()[0], steps=2000, batch_size=64, warmup=100,
                        plot=REPO / "docs" / "digits-ddpm-loss.png")
    p.add_argument("--no-score", action="store_true", help="skip the recognisability score (200 samples)")
    add_mode_options(p)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.threads < 1:
        p.error("--steps, --batch-size and --threads must be at least 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from sigec.models import load, read_manifest

    if args.score_only:
        torch.set_num_threads(args.threads)
        unet, scheduler_config = load(NAME)
        s = score(unet, scheduler_config, read_manifest(NAME)["training"]["seed"])
        print(json.dumps(s, indent=2))
        return 0
    if args.check:
        args.no_score = True
        return check_reproduction(args, NAME, lambda folder: run(args, folder, None))
    run(args, args.out_dir, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
