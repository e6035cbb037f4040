"""What the training scripts in examples/ share: the learning-rate schedule, the recorded final
loss, the loss-curve picture (drawn with PIL, no plotting library) and writing a shipped model
(safetensors weights plus a JSON manifest with their size and SHA-256, read by
``sigec.models.load``)."""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image, ImageDraw

#: the manifest format ``sigec.models.read_manifest`` reads
MANIFEST_FORMAT = 2
#: where trained models ship
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "sigec" / "models" / "weights"
#: the settings a reproduction check compares with the shipped model's
OPTIMIZER_SETTINGS = ("seed", "steps", "batch_size", "lr", "warmup", "ema_decay")


def training_parser(description: str, *, steps: int, batch_size: int, warmup: int,
                    plot: Path) -> argparse.ArgumentParser:
    """The options every training script has; add the script's own, then ``add_mode_options``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=batch_size, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=warmup, help="warm-up steps (default: %(default)s)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--out-dir", type=Path, default=WEIGHTS_DIR,
                   help="where the weights and manifest go (default: the package's sigec/models/weights)")
    p.add_argument("--plot", type=Path, default=plot, help="loss curve PNG (default: %(default)s)")
    return p


def add_mode_options(p: argparse.ArgumentParser) -> None:
    """``--check`` (train again and compare with the shipped loss) and ``--score-only``."""
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="train into a temporary folder and compare the final loss with the shipped model's")
    mode.add_argument("--score-only", action="store_true", help="score the shipped weights; no training")


def check_reproduction(args: argparse.Namespace, name: str, train_into: Callable[[Path], dict],
                       settings: Sequence[str] = OPTIMIZER_SETTINGS) -> int:
    """Train again into a temporary folder (``train_into(folder) -> manifest``) and compare the
    final loss with the shipped model's: exit status 0 within 10%, else 1."""
    from sigec.models import read_manifest

    shipped = read_manifest(name)
    differing = {k: (shipped["training"][k], getattr(args, k)) for k in settings
                 if getattr(args, k) != shipped["training"].get(k)}
    if differing:
        print(f"note: settings differ from the shipped model's (shipped, now): {differing}")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = train_into(Path(tmp))
    rel = abs(manifest["final_loss"] - shipped["final_loss"]) / shipped["final_loss"]
    ok = rel <= 0.10
    print(f"check: final loss {manifest['final_loss']:.5f} vs shipped {shipped['final_loss']:.5f} "
          f"({rel:.2%} apart; bar 10%): {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak``, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_step(model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   loss: torch.Tensor, step: int, args: argparse.Namespace) -> None:
    """One step: the scheduled learning rate, gradients clipped to norm 1, then the weights'
    exponential moving average (``args.ema_decay``, with a short memory early on)."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    decay = min(args.ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)


def final_loss(losses: Sequence[float], window: int) -> float:
    """The recorded final loss: the mean training loss of the last ``window`` steps."""
    tail = losses[-window:]
    return sum(tail) / len(tail)


def save_model(model: torch.nn.Module, out_dir: Path, name: str, manifest: dict) -> dict:
    """Write ``<name>.safetensors`` and ``<name>.json`` (with the weights' size and SHA-256)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{name}.safetensors"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights), metadata={"format": "pt", "name": name})
    weights.chmod(0o644)   # safetensors writes 0600; package data must be readable by everyone
    data = weights.read_bytes()
    manifest = {"format": MANIFEST_FORMAT, "name": name, "weights": weights.name, "size_bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(), **manifest}
    (out_dir / f"{name}.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def draw_loss_curve(losses: Sequence[float], path: Path, title: str, window: int) -> None:
    """Per-step loss (light) and its running mean over ``window`` steps (dark), log-scale y."""
    width, height, left, right, top, bottom = 720, 400, 70, 20, 36, 44
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    lo = min(losses)
    hi = max(losses)
    lo_exp, hi_exp = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(step: float, value: float) -> tuple[float, float]:
        x = left + plot_w * step / max(1, len(losses) - 1)
        y = top + plot_h * (hi_exp - math.log10(value)) / (hi_exp - lo_exp)
        return x, y

    for exp in range(lo_exp, hi_exp + 1):     # decade grid lines and labels
        for mult in (1, 2, 5):
            v = mult * 10.0 ** exp
            if not 10.0 ** lo_exp <= v <= 10.0 ** hi_exp:
                continue
            _, y = xy(0, v)
            draw.line([(left, y), (width - right, y)], fill=(225, 225, 225) if mult > 1 else (190, 190, 190))
            if mult in (1, 2, 5):
                draw.text((6, y - 6), f"{v:g}", fill=(60, 60, 60))
    for i in range(6):                        # step ticks (steps counted from 1)
        step = round(i * len(losses) / 5)
        x, _ = xy(max(0, step - 1), 10.0 ** hi_exp)
        draw.line([(x, top + plot_h), (x, top + plot_h + 4)], fill=(0, 0, 0))
        draw.text((x - 12, top + plot_h + 8), str(step), fill=(60, 60, 60))
    draw.rectangle([left, top, width - right, top + plot_h], outline=(0, 0, 0))
    draw.line([xy(i, v) for i, v in enumerate(losses)], fill=(170, 200, 235), width=1)
    running, total = [], 0.0
    for i, v in enumerate(losses):
        total += v - (losses[i - window] if i >= window else 0.0)
        running.append(total / min(i + 1, window))
    draw.line([xy(i, v) for i, v in enumerate(running)], fill=(20, 60, 160), width=2)
    draw.text((left, 10), title, fill=(0, 0, 0))
    draw.text((left + plot_w // 2 - 40, height - 18), "training step", fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
