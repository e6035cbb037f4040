"""Built-in models: trained ones that ship with sigec, and seeded random ones built from
configurations (no downloads).

* ``ddpm_unet(name)`` - diffusers ``UNet2DModel``: ``"church256"`` is the DDPM LSUN-church-256
  configuration; ``"church-small"`` has its block structure with fewer channels; ``"demo"`` is
  the small DDPM-style UNet of ``sigec demo --model random-unet``.
* ``sd_unet(name)`` - diffusers ``UNet2DConditionModel``: ``"sd1"`` is the Stable Diffusion 1.x
  configuration (64x64 latent, cross-attention dim 768); ``"sd-tiny"`` has its block structure
  with few channels, for tests.
* ``SpadeGenerator`` - a GauGAN-style generator (SPADE residual blocks, nearest up-sampling),
  written from the paper's description; ``spade_generator()`` is a small one and
  ``gaugan_cityscapes()`` the paper's Cityscapes configuration (256x512, about 281 GMACs).
* ``load(name)`` - a *trained* model that ships with sigec (``sigec/models/weights/``):
  ``"landscape"`` is the label-map generator of ``sigec demo`` and ``sigec editor``
  (``sigec.models.landscape``, ``examples/train_landscape.py``); ``"digits-ddpm"`` is a small DDPM
  UNet trained on scikit-learn's digits (``examples/train_tiny_ddpm.py``).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

_CHURCH_DOWN = ("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D")
_CHURCH_UP = ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D")

UNET_CONFIGS = {
    # google/ddpm-ema-church-256: attention at 16x16, two resnets per level
    "church256": dict(sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
                      block_out_channels=(128, 128, 256, 256, 512, 512),
                      down_block_types=_CHURCH_DOWN, up_block_types=_CHURCH_UP),
    "church-small": dict(sample_size=64, in_channels=3, out_channels=3, layers_per_block=1,
                         block_out_channels=(16, 16, 32, 32, 64, 64), norm_num_groups=8,
                         down_block_types=_CHURCH_DOWN, up_block_types=_CHURCH_UP),
    "demo": dict(sample_size=64, in_channels=3, out_channels=3, layers_per_block=1,
                 block_out_channels=(32, 64, 64, 128), norm_num_groups=16,
                 down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
}


def ddpm_unet(name: str = "demo", seed: int = 0, resolution: int | None = None) -> nn.Module:
    """A diffusers ``UNet2DModel`` from a named configuration, seeded, in eval mode."""
    from diffusers import UNet2DModel

    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown UNet configuration {name!r}; choose from {sorted(UNET_CONFIGS)}")
    config = dict(UNET_CONFIGS[name])
    if resolution is not None:
        config["sample_size"] = resolution
    torch.manual_seed(seed)
    return UNet2DModel(**config).eval()


SD_UNET_CONFIGS = {
    # Stable Diffusion 1.x: UNet2DConditionModel's defaults with a 768-wide text embedding
    "sd1": dict(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768, attention_head_dim=8),
    "sd-tiny": dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                    block_out_channels=(32, 64, 64, 64), norm_num_groups=8, cross_attention_dim=32,
                    attention_head_dim=8),
    # Stable Diffusion XL base: three levels, 1/2/10 transformer layers, text-and-time added conditioning
    # (a 1280-wide pooled text embedding and six 256-wide time ids: 2816 inputs), 128x128 latent
    "sdxl": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
    # its structure with few channels and 1/2/3 transformer layers (pooled text 32 wide, time ids 8 wide)
    "sdxl-tiny": dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 2, 3),
                      attention_head_dim=(2, 4, 4), norm_num_groups=8, cross_attention_dim=64,
                      use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=32 + 6 * 8),
}

#: width of the pooled text embedding an SDXL configuration's added conditioning expects
SDXL_POOLED_DIM = {"sdxl": 1280, "sdxl-tiny": 32}


def sd_unet(name: str = "sd-tiny", seed: int = 0) -> nn.Module:
    """A diffusers ``UNet2DConditionModel`` from a named configuration, seeded, in eval mode.

    Call it as ``unet(latent, t, encoder_hidden_states=text)`` with ``text`` of shape
    ``(batch, 77, cross_attention_dim)``.
    """
    from diffusers import UNet2DConditionModel

    if name not in SD_UNET_CONFIGS:
        raise ValueError(f"unknown UNet2DConditionModel configuration {name!r}; choose from {sorted(SD_UNET_CONFIGS)}")
    torch.manual_seed(seed)
    return UNet2DConditionModel(**SD_UNET_CONFIGS[name]).eval()


def autoencoder_kl(channels: tuple[int, ...] = (32, 64), norm_num_groups: int = 16, seed: int = 0) -> nn.Module:
    """A small diffusers ``AutoencoderKL`` (two levels, 4 latent channels), seeded, in eval mode."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels), latent_channels=4,
                         norm_num_groups=norm_num_groups, layers_per_block=1).eval()


class Spade(nn.Module):
    """Spatially-adaptive normalization: param-free norm modulated by convs of the label map."""

    def __init__(self, channels: int, label_channels: int, hidden: int = 32):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(label_channels, hidden, 3, padding=1), nn.ReLU())
        self.gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        seg = F.interpolate(seg, size=x.shape[2:], mode="nearest")
        actv = self.shared(seg)
        return self.norm(x) * (1 + self.gamma(actv)) + self.beta(actv)


class SpadeResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, label_channels: int, hidden: int = 32):
        super().__init__()
        mid = min(cin, cout)
        self.norm_0, self.conv_0 = Spade(cin, label_channels, hidden), nn.Conv2d(cin, mid, 3, padding=1)
        self.norm_1, self.conv_1 = Spade(mid, label_channels, hidden), nn.Conv2d(mid, cout, 3, padding=1)
        self.learned_shortcut = cin != cout
        if self.learned_shortcut:
            self.norm_s = Spade(cin, label_channels, hidden)
            self.conv_s = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        xs = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 0.2))
        return xs + dx


class SpadeGenerator(nn.Module):
    """GauGAN-style generator: label map -> image, starting from the down-sampled label map.

    ``stages`` lists the SPADE residual blocks as ``(in channels, out channels, upsample first)``;
    the input is the label map, resized to ``start`` (height, width) and convolved to the first
    block's channels.
    """

    def __init__(self, label_channels: int, stages: list[tuple[int, int, bool]], start: tuple[int, int],
                 hidden: int = 32):
        super().__init__()
        self.start = start
        self.fc = nn.Conv2d(label_channels, stages[0][0], 3, padding=1)
        self.blocks = nn.ModuleList(SpadeResBlock(cin, cout, label_channels, hidden) for cin, cout, _ in stages)
        self.upsample_first = [up for _, _, up in stages]
        self.conv_img = nn.Conv2d(stages[-1][1], 3, 3, padding=1)

    def forward(self, seg: torch.Tensor) -> torch.Tensor:
        x = self.fc(F.interpolate(seg, size=self.start, mode="nearest"))
        for block, up in zip(self.blocks, self.upsample_first):
            if up:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = block(x, seg)
        return torch.tanh(self.conv_img(F.leaky_relu(x, 0.2)))


def _seeded(model: nn.Module, seed: int) -> nn.Module:
    """Eval mode, with non-trivial batch-norm running statistics (random weights otherwise)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def spade_generator(label_channels: int = 8, seed: int = 0, base: int = 32, levels: int = 4,
                    start: "int | tuple[int, int]" = 8) -> SpadeGenerator:
    """A small seeded SPADE generator: a head block, then ``levels`` up-sampling blocks from a
    ``start`` (height, width) grid, which should have the label map's aspect ratio."""
    torch.manual_seed(seed)
    chans = [base * 2 ** max(0, levels - 1 - i) for i in range(levels + 1)]
    stages = [(chans[0], chans[0], False)] + [(chans[i], chans[i + 1], True) for i in range(levels)]
    start = (start, start) if isinstance(start, int) else tuple(start)
    return _seeded(SpadeGenerator(label_channels, stages, start), seed)


def gaugan_cityscapes(seed: int = 0, ngf: int = 64) -> SpadeGenerator:
    """GauGAN's Cityscapes generator: 35 labels plus an instance-edge channel, 256x512 output,
    ngf 64, the "more" up-sampling setting (a 4x8 start, six up-samplings), SPADE hidden width 128,
    parameter-free batch norm. Random weights, seeded."""
    torch.manual_seed(seed)
    nf = ngf
    stages = [(16 * nf, 16 * nf, False),  # head_0
              (16 * nf, 16 * nf, True),   # G_middle_0
              (16 * nf, 16 * nf, True),   # G_middle_1 ("more": an extra up-sampling before it)
              (16 * nf, 8 * nf, True),    # up_0
              (8 * nf, 4 * nf, True),     # up_1
              (4 * nf, 2 * nf, True),     # up_2
              (2 * nf, 1 * nf, True)]     # up_3
    return _seeded(SpadeGenerator(36, stages, (4, 8), hidden=128), seed)


def label_map(label_channels: int, size: int, seed: int = 0, width: int | None = None,
              edge_channel: bool = False) -> torch.Tensor:
    """A one-hot ``(1, C, size, width)`` label map of random rectangles (a coarse segmentation).

    With ``edge_channel`` the last of the ``label_channels`` channels is an instance-edge map
    (1 where the label changes), as GauGAN's Cityscapes input has.
    """
    width = width or size
    classes = label_channels - 1 if edge_channel else label_channels
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(size, width, dtype=torch.long)
    for _ in range(12):
        y, x = torch.randint(0, size, (1,), generator=g).item(), torch.randint(0, width, (1,), generator=g).item()
        h = int(torch.randint(size // 8, size // 2, (1,), generator=g))
        w = int(torch.randint(width // 8, width // 2, (1,), generator=g))
        labels[y:y + h, x:x + w] = int(torch.randint(0, classes, (1,), generator=g))
    onehot = F.one_hot(labels, classes).permute(2, 0, 1)[None].float()
    if not edge_channel:
        return onehot
    return torch.cat([onehot, instance_edges(labels)[None, None]], dim=1)


def instance_edges(labels: torch.Tensor) -> torch.Tensor:
    """1.0 where a pixel's label differs from a 4-neighbour's, else 0.0 (GauGAN's edge map)."""
    edge = torch.zeros(labels.shape, dtype=torch.bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:-1, :] |= labels[1:, :] != labels[:-1, :]
    return edge.float()


# ---------------------------------------------------------------------------------------------
# trained models that ship with sigec (``sigec/models/weights/``)

#: where the shipped models live: ``<name>.json`` (the manifest) next to ``<name>.safetensors``
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST_FORMAT = 2


def _model_class(name: str) -> type:
    """The class a manifest may name: a diffusers UNet, or a network defined in sigec.models."""
    if name == "UNet2DModel":
        from diffusers import UNet2DModel

        return UNet2DModel
    if name == "LandscapeGenerator":
        from sigec.models.landscape import LandscapeGenerator

        return LandscapeGenerator
    raise KeyError(name)


_LOADABLE_CLASSES = ("UNet2DModel", "LandscapeGenerator")


class WeightsError(ValueError):
    """A shipped or user-supplied weights file is missing, corrupted, or does not fit its manifest."""


class LoadedModel(NamedTuple):
    """What ``load`` returns: the model in eval mode, and for a diffusion model its training
    scheduler's configuration (``DDIMScheduler.from_config(...)``; ``None`` for a generator)."""

    model: nn.Module
    scheduler_config: Optional[dict]


def available_models(directory: "str | Path | None" = None) -> list[str]:
    """Names ``load`` accepts: the manifests (``<name>.json``) in ``directory`` (default: shipped)."""
    folder = Path(directory) if directory is not None else WEIGHTS_DIR
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def read_manifest(name: str = "digits-ddpm", directory: "str | Path | None" = None) -> dict:
    """The manifest of a shipped model: its UNet and scheduler configurations, the checksum and
    size of its weights file, and what training recorded (final loss, settings, scores)."""
    folder = Path(directory) if directory is not None else WEIGHTS_DIR
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise WeightsError(f"model name {name!r} is not a plain name (letters, digits, '.', '_', '-'); "
                           "to load from another folder pass directory=")
    path = folder / f"{name}.json"
    if not path.is_file():
        known = available_models(folder)
        raise WeightsError(f"no model {name!r} in {folder} (no {path.name}); available: {known or 'none'}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"manifest {path} is not valid JSON ({exc}); reinstall sigec or re-create it "
                           "with its training script in examples/") from exc
    if not isinstance(manifest, dict):
        raise WeightsError(f"manifest {path} is not a JSON object; re-create it with its training script in examples/")
    missing = [k for k in ("format", "weights", "sha256", "size_bytes", "model_class", "model_config")
               if k not in manifest]
    if missing:
        raise WeightsError(f"manifest {path} lacks {missing}; re-create it with its training script in examples/")
    if Path(str(manifest["weights"])).name != manifest["weights"]:
        raise WeightsError(f"manifest {path} names weights {manifest['weights']!r}, which is not a plain file "
                           f"name in {folder}")
    if manifest["format"] != MANIFEST_FORMAT:
        raise WeightsError(f"manifest {path} has format {manifest['format']!r}; this sigec reads format "
                           f"{MANIFEST_FORMAT}")
    return manifest


def verified_weights(path: Path, sha256: str, size_bytes: int) -> bytes:
    """The bytes of ``path`` after checking its size and SHA-256 against the manifest's record.

    The checked bytes are the ones parsed (no second read of the file).
    """
    if not path.is_file():
        raise WeightsError(f"weights file {path} is missing; reinstall sigec")
    data = path.read_bytes()
    if len(data) != size_bytes:
        raise WeightsError(f"weights file {path} is {len(data):,} bytes but its manifest records {size_bytes:,} "
                           f"({'truncated' if len(data) < size_bytes else 'extra bytes'}); reinstall sigec")
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise WeightsError(f"weights file {path} has SHA-256 {digest[:16]}... but its manifest records "
                           f"{sha256[:16]}...: the file was modified or corrupted; reinstall sigec")
    return data


def load(name: str = "digits-ddpm", directory: "str | Path | None" = None) -> LoadedModel:
    """A trained model that ships with sigec, e.g. ``unet, scheduler_config = load("digits-ddpm")``.

    * ``landscape`` - a ``LandscapeGenerator`` (label map + noise map -> picture, any size; the
      demo's and editor's model), trained by ``examples/train_landscape.py``.
    * ``digits-ddpm`` - a diffusers ``UNet2DModel`` (DDPM, epsilon prediction, 1x16x16 images in
      [-1, 1], ink bright) trained on scikit-learn's digits by ``examples/train_tiny_ddpm.py``.

    ``directory`` reads ``<name>.json`` and its weights from another folder (for example the
    training script's output). Nothing is downloaded and nothing is unpickled: the weights are
    safetensors, parsed only after their size and SHA-256 match the manifest; a modified or
    truncated file raises ``WeightsError``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    folder = Path(directory) if directory is not None else WEIGHTS_DIR
    manifest = read_manifest(name, folder)
    if manifest["model_class"] not in _LOADABLE_CLASSES:
        raise WeightsError(f"manifest of {name!r} names model class {manifest['model_class']!r}; this sigec "
                           f"builds {_LOADABLE_CLASSES}")
    data = verified_weights(folder / manifest["weights"], manifest["sha256"], manifest["size_bytes"])
    try:
        state = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:  # checksum matched a file that never parsed
        raise WeightsError(f"weights file {folder / manifest['weights']} is not a valid safetensors file "
                           f"({exc})") from exc
    model_class = _model_class(manifest["model_class"])
    try:
        with torch.random.fork_rng(devices=[]):  # building initialises random weights: keep the caller's RNG
            model = model_class(**manifest["model_config"])
        model.load_state_dict(state, strict=True)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"weights of {name!r} do not fit its model configuration: {exc}") from exc
    scheduler_config = manifest.get("scheduler_config")
    return LoadedModel(model.eval(), dict(scheduler_config) if scheduler_config is not None else None)
