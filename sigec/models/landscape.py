"""The landscape generator: a label map of landscape classes plus a noise map -> an RGB picture.

It belongs to the GauGAN/SPADE family (the label map modulates every layer's features, pixel by
pixel) with one change that matters to an incremental engine: SPADE's parameter-free
normalization is left out. Its statistics are image-wide, so under it an edit anywhere changes
every pixel a little; without it the network is *local* (receptive field 13x13 pixels), and
sigec's ``exact`` policy reproduces the dense output to float rounding from a few percent of the
work. Texture comes from the noise map: a fixed, seeded white-noise image (the picture's "style"),
which the network filters into grass, water or rock according to the label at each pixel.

Inputs: ``labels`` one-hot ``(N, len(CLASSES), H, W)`` and ``noise`` ``(N, 1, H, W)``; output
``(N, 3, H, W)`` in [-1, 1]. Fully convolutional: trained on crops, run at any size.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

#: the classes a user paints, in channel order
CLASSES = ("sky", "water", "grass", "tree", "rock", "sand", "brick", "snow")

#: flat display colours of the classes (RGB 0-255), for drawing label maps
PALETTE = {
    "sky": (135, 190, 235), "water": (40, 90, 170), "grass": (110, 190, 60), "tree": (30, 110, 40),
    "rock": (120, 120, 120), "sand": (225, 200, 140), "brick": (170, 70, 50), "snow": (245, 245, 250),
}


class Modulation(nn.Module):
    """SPADE's spatially-adaptive scale and shift, computed per pixel from the label map (1x1
    convolutions: the class at a pixel decides its modulation, so it adds no receptive field)."""

    def __init__(self, channels: int, classes: int, hidden: int):
        super().__init__()
        self.embed = nn.Conv2d(classes, hidden, 1)
        self.gamma = nn.Conv2d(hidden, channels, 1)
        self.beta = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        code = F.relu(self.embed(labels))
        return x * (1 + self.gamma(code)) + self.beta(code)


class ModulatedResBlock(nn.Module):
    """SPADE's residual block without normalization: two modulated 3x3 convolutions."""

    def __init__(self, channels: int, classes: int, hidden: int):
        super().__init__()
        self.mod_0, self.conv_0 = Modulation(channels, classes, hidden), nn.Conv2d(channels, channels, 3, padding=1)
        self.mod_1, self.conv_1 = Modulation(channels, classes, hidden), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dx = self.conv_0(F.leaky_relu(self.mod_0(x, labels), 0.2))
        return x + self.conv_1(F.leaky_relu(self.mod_1(dx, labels), 0.2))


class LandscapeGenerator(nn.Module):
    """Label map + noise -> picture: a 3x3 stem, ``blocks`` modulated residual blocks and a
    modulated 3x3 head, all at full resolution."""

    def __init__(self, classes: int = len(CLASSES), width: int = 64, blocks: int = 2, hidden: int = 32):
        super().__init__()
        self.classes = classes
        self.stem = nn.Conv2d(classes + 1, width, 3, padding=1)
        self.blocks = nn.ModuleList(ModulatedResBlock(width, classes, hidden) for _ in range(blocks))
        self.head_mod = Modulation(width, classes, hidden)
        self.head = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, labels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        x = self.stem(torch.cat([labels, noise], dim=1))
        for block in self.blocks:
            x = block(x, labels)
        return torch.tanh(self.head(F.leaky_relu(self.head_mod(x, labels), 0.2)))


def one_hot(labels: torch.Tensor, classes: int = len(CLASSES)) -> torch.Tensor:
    """``(H, W)`` or ``(N, H, W)`` class indices -> a float one-hot ``(N, classes, H, W)``."""
    if labels.dim() == 2:
        labels = labels[None]
    if labels.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ValueError(f"labels must lie in [0, {classes}), got [{int(labels.min())}, {int(labels.max())}]")
    return F.one_hot(labels.long(), classes).permute(0, 3, 1, 2).float().contiguous()


def noise_map(height: int, width: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """The seeded white-noise map ``(batch, 1, H, W)`` a picture is rendered from (its style)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, height, width, generator=g)


def colorize(labels: torch.Tensor) -> torch.Tensor:
    """``(H, W)`` class indices -> ``(H, W, 3)`` uint8 picture of the label map in ``PALETTE``."""
    lut = torch.tensor([PALETTE[name] for name in CLASSES], dtype=torch.uint8)
    return lut[labels.long()]
