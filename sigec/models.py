"""Built-in models: seeded, randomly initialised, built from configurations (no downloads).

* ``ddpm_unet(name)`` - diffusers ``UNet2DModel``: ``"church256"`` is the DDPM LSUN-church-256
  configuration; ``"church-small"`` has its block structure with fewer channels; ``"demo"`` is
  the small DDPM-style UNet ``sigec demo`` uses.
* ``SpadeGenerator`` - a GauGAN-style generator (SPADE residual blocks, nearest up-sampling),
  written from the paper's description.
"""
from __future__ import annotations

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
    def __init__(self, cin: int, cout: int, label_channels: int):
        super().__init__()
        mid = min(cin, cout)
        self.norm_0, self.conv_0 = Spade(cin, label_channels), nn.Conv2d(cin, mid, 3, padding=1)
        self.norm_1, self.conv_1 = Spade(mid, label_channels), nn.Conv2d(mid, cout, 3, padding=1)
        self.learned_shortcut = cin != cout
        if self.learned_shortcut:
            self.norm_s, self.conv_s = Spade(cin, label_channels), nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        xs = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 0.2))
        return xs + dx


class SpadeGenerator(nn.Module):
    """GauGAN-style generator: label map -> image, starting from the down-sampled label map."""

    def __init__(self, label_channels: int = 8, base: int = 32, levels: int = 4, start: int = 8):
        super().__init__()
        self.start = start
        chans = [base * 2 ** max(0, levels - 1 - i) for i in range(levels + 1)]
        self.fc = nn.Conv2d(label_channels, chans[0], 3, padding=1)
        self.head = SpadeResBlock(chans[0], chans[0], label_channels)
        self.blocks = nn.ModuleList(SpadeResBlock(chans[i], chans[i + 1], label_channels) for i in range(levels))
        self.conv_img = nn.Conv2d(chans[-1], 3, 3, padding=1)

    def forward(self, seg: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(seg, size=(self.start, self.start), mode="nearest")
        x = self.head(self.fc(x), seg)
        for block in self.blocks:
            x = block(F.interpolate(x, scale_factor=2.0, mode="nearest"), seg)
        return torch.tanh(self.conv_img(F.leaky_relu(x, 0.2)))


def spade_generator(label_channels: int = 8, seed: int = 0, **kwargs) -> SpadeGenerator:
    """A seeded ``SpadeGenerator`` in eval mode, with non-trivial batch-norm running statistics."""
    torch.manual_seed(seed)
    model = SpadeGenerator(label_channels, **kwargs)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def label_map(label_channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """A one-hot label map of random rectangles (like a coarse segmentation)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(size, size, dtype=torch.long)
    for _ in range(12):
        y, x = torch.randint(0, size, (2,), generator=g).tolist()
        h, w = torch.randint(size // 8, size // 2, (2,), generator=g).tolist()
        labels[y:y + h, x:x + w] = int(torch.randint(0, label_channels, (1,), generator=g))
    return F.one_hot(labels, label_channels).permute(2, 0, 1)[None].float()
