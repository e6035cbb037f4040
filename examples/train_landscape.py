"""Train the landscape generator that ships with sigec (``sigec.models.load("landscape")``).

A ``LandscapeGenerator`` (label map + noise map -> picture; sigec/models/landscape.py) learns to
render procedural landscape label maps with textures made from the photos that scikit-image
and scikit-learn bundle (sigec/models/landscape_data.py). The network is fully convolutional
with a 13x13 receptive field, so it trains on small crops and runs at any size. Everything is
seeded: the initialisation, the label maps, the crops and the noise, so a run with the same seed
and thread count repeats.

    pip install scikit-image scikit-learn           # the photos (the "test" extra has both)
    python examples/train_landscape.py              # ~48 min on 2 CPU threads; writes
                                                    # sigec/models/weights/landscape.{safetensors,json}
    python examples/train_landscape.py --check      # train again into a temporary folder and compare
                                                    # the final loss with the shipped model's (within 10%)
    python examples/train_landscape.py --score-only # held-out scores of the shipped weights

It writes the weights and the manifest (configuration, SHA-256, final loss, training settings,
held-out scores) into ``--out-dir``, the loss curve (``--plot``) and a grid of held-out label maps
with their renderings and targets (``--grid``).

**Held-out score.** Eight 256x512 label maps (four landscapes, four blob maps) and noise maps
that training never saw: L1 and PSNR of the rendering against its target, next to the PSNR of
the flat class colours (what a model without texture would reach).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch loads OpenMP; a user's value wins

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))   # examples/training_common.py
from training_common import (OPTIMIZER_SETTINGS, add_mode_options, check_reproduction,  # noqa: E402
                             draw_loss_curve, final_loss, optimizer_step, save_model, training_parser)

from sigec.models.landscape import (CLASSES, LandscapeGenerator, colorize, noise_map, one_hot,  # noqa: E402
                                    picture_pixels, random_blobs, random_scene)
from sigec.models.landscape_data import render_target, textures  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NAME = "landscape"
MODEL_CONFIG = dict(classes=len(CLASSES), width=64, blocks=2, hidden=32)
MAP_SIZE = (256, 512)      # the label maps crops are cut from, and the held-out size
HELD_OUT = 8
HELD_OUT_SEED = 1_000_000  # held-out maps and noise use seeds from here; training's are below
LOSS_WINDOW = 200


def label_pool(count: int, seed: int) -> torch.Tensor:
    """``count`` training label maps ``(count, H, W)`` uint8: landscapes and blob maps alternately."""
    maps = [(random_scene if i % 2 == 0 else random_blobs)(*MAP_SIZE, seed=seed * 100_003 + i)
            for i in range(count)]
    return torch.stack(maps).to(torch.uint8)


def held_out() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The held-out (class indices, noise) pairs."""
    return [((random_scene if i < HELD_OUT // 2 else random_blobs)(*MAP_SIZE, seed=HELD_OUT_SEED + i),
             noise_map(*MAP_SIZE, seed=HELD_OUT_SEED + i)) for i in range(HELD_OUT)]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of pictures in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / max(F.mse_loss(a, b).item(), 1e-12))


@torch.no_grad()
def score(model: torch.nn.Module) -> dict:
    """Held-out L1 and PSNR against the targets, and the flat-colour PSNR for reference."""
    bank = textures()
    l1, ps, flat = [], [], []
    for labels, noise in held_out():
        x = one_hot(labels)
        target = render_target(x, noise, bank)
        out = model(x, noise)
        l1.append(F.l1_loss(out, target).item())
        ps.append(psnr(out, target))
        flat.append(psnr(render_target(x, torch.zeros_like(noise), bank), target))
    return {"maps": HELD_OUT, "size": list(MAP_SIZE), "l1": round(float(np.mean(l1)), 5),
            "psnr_db": round(float(np.mean(ps)), 2), "flat_colour_psnr_db": round(float(np.mean(flat)), 2)}


@torch.no_grad()
def draw_grid(model: torch.nn.Module, path: Path, rows: int = 4) -> None:
    """Held-out label maps (left), the model's renderings (middle) and the targets (right)."""
    bank = textures()
    pairs = held_out()
    picks = [pairs[i] for i in (0, 1, HELD_OUT // 2, HELD_OUT // 2 + 1)][:rows]
    lines = []
    for labels, noise in picks:
        x = one_hot(labels)
        lines.append(np.concatenate([colorize(labels).numpy(), picture_pixels(model(x, noise)).numpy(),
                                     picture_pixels(render_target(x, noise, bank)).numpy()], axis=1))
    grid = np.concatenate(lines, axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] // 2, grid.shape[0] // 2), Image.LANCZOS).save(path)


def train(args: argparse.Namespace) -> dict:
    """Train; returns the EMA model, the per-step losses and the run's timing."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = LandscapeGenerator(**MODEL_CONFIG).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    bank = textures()
    pool = label_pool(args.pool, args.seed)
    g = torch.Generator().manual_seed(args.seed)   # crops and noise
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="training", unit="step", dynamic_ncols=True)
    for step in bar:
        pick = torch.randint(0, len(pool), (args.batch_size,), generator=g)
        ys = torch.randint(0, MAP_SIZE[0] - args.crop + 1, (args.batch_size,), generator=g)
        xs = torch.randint(0, MAP_SIZE[1] - args.crop + 1, (args.batch_size,), generator=g)
        labels = torch.stack([pool[i, y:y + args.crop, x:x + args.crop]
                              for i, y, x in zip(pick.tolist(), ys.tolist(), xs.tolist())])
        x = one_hot(labels)
        noise = torch.randn(args.batch_size, 1, args.crop, args.crop, generator=g)
        target = render_target(x, noise, bank)
        loss = F.l1_loss(model(x, noise), target)
        optimizer_step(model, ema, optimizer, loss, step, args)
        losses.append(float(loss.detach()))
        if step % 20 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-LOSS_WINDOW:]) / len(losses[-LOSS_WINDOW:]):.4f}")
    return {"ema": ema, "losses": losses, "seconds": time.perf_counter() - start}


def run(args: argparse.Namespace, out_dir: Path, plot: Optional[Path], grid: Optional[Path]) -> dict:
    """Train, save the weights and the manifest into ``out_dir``, score, draw the pictures."""
    result = train(args)
    losses, ema = result["losses"], result["ema"]
    loss = final_loss(losses, LOSS_WINDOW)
    manifest = {
        "model_class": "LandscapeGenerator", "model_config": MODEL_CONFIG, "classes": list(CLASSES),
        "parameters": sum(p.numel() for p in ema.parameters()),
        "inputs": {"labels": "one-hot (N, classes, H, W) float", "noise": "(N, 1, H, W) N(0, 1)"},
        "data": {"layouts": "sigec.models.landscape.random_scene / random_blobs", "map_size": list(MAP_SIZE),
                 "targets": "sigec.models.landscape_data (Gaussian textures of scikit-image and "
                            "scikit-learn photos)"},
        "final_loss": loss, "final_loss_window": LOSS_WINDOW,
        "training": {"seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "crop": args.crop,
                     "pool": args.pool, "lr": args.lr, "warmup": args.warmup, "ema_decay": args.ema_decay,
                     "threads": args.threads, "seconds": round(result["seconds"], 1), "torch": torch.__version__,
                     "python": platform.python_version()},
    }
    if not args.no_score:
        manifest["held_out"] = score(ema)
    manifest = save_model(ema, out_dir, NAME, manifest)
    if plot is not None:
        draw_loss_curve(losses, plot, f"{NAME}: {args.steps} steps, batch {args.batch_size} of {args.crop}x"
                                      f"{args.crop}, final L1 {loss:.4f} (mean of last {LOSS_WINDOW})", LOSS_WINDOW)
    if grid is not None:
        draw_grid(ema, grid)
    print(f"trained {args.steps} steps in {result['seconds'] / 60:.1f} min ({args.threads} threads); "
          f"final loss {loss:.4f}; weights {manifest['size_bytes']:,} bytes -> {out_dir}")
    if "held_out" in manifest:
        h = manifest["held_out"]
        print(f"held-out ({h['maps']} maps of {h['size'][0]}x{h['size'][1]}): L1 {h['l1']:.4f}, PSNR "
              f"{h['psnr_db']:.2f} dB (flat class colours: {h['flat_colour_psnr_db']:.2f} dB)")
    return manifest


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = training_parser(__doc__.splitlines()[0], steps=4000, batch_size=8, warmup=200,
                        plot=REPO / "docs" / "landscape-loss.png")
    p.add_argument("--crop", type=int, default=64, help="side of the training crops (default: %(default)s)")
    p.add_argument("--pool", type=int, default=256, help="training label maps (default: %(default)s)")
    p.add_argument("--grid", type=Path, default=REPO / "docs" / "landscape-heldout.png",
                   help="held-out picture grid PNG (default: %(default)s)")
    p.add_argument("--no-score", action="store_true", help="skip the held-out score")
    add_mode_options(p)
    args = p.parse_args(argv)
    if min(args.steps, args.batch_size, args.threads, args.pool) < 1 or not 16 <= args.crop <= min(MAP_SIZE):
        p.error(f"--steps, --batch-size, --threads and --pool must be at least 1, --crop in [16, {min(MAP_SIZE)}]")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from sigec.models import load

    if args.score_only:
        torch.set_num_threads(args.threads)
        print(score(load(NAME).model))
        return 0
    if args.check:
        args.no_score = True
        return check_reproduction(args, NAME, lambda folder: run(args, folder, None, None),
                                  OPTIMIZER_SETTINGS + ("crop", "pool"))
    run(args, args.out_dir, args.plot, args.grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
