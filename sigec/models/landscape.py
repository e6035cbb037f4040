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


def picture_pixels(picture: torch.Tensor) -> torch.Tensor:
    """The generator's ``(3, H, W)`` or ``(1, 3, H, W)`` output in [-1, 1] -> ``(H, W, 3)`` uint8."""
    if picture.dim() == 4:
        picture = picture[0]
    return ((picture.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous()


def colorize(labels: torch.Tensor) -> torch.Tensor:
    """``(H, W)`` class indices -> ``(H, W, 3)`` uint8 picture of the label map in ``PALETTE``."""
    lut = torch.tensor([PALETTE[name] for name in CLASSES], dtype=torch.uint8)
    return lut[labels.long()]


# ---------------------------------------------------------------------------------------------
# procedural label maps: the training data's layouts and the demo's and editor's starting scene

def _smooth_noise(shape: tuple[int, ...], cells: int, size: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """Values in about [-1, 1] that vary smoothly over ``size``, with ``cells`` features across."""
    h, w = size
    coarse = torch.randn(*shape, max(2, round(cells * h / max(h, w))) + 1, max(2, round(cells * w / max(h, w))) + 1,
                         generator=g)
    return F.interpolate(coarse, size=size, mode="bicubic", align_corners=True).clamp(-2.5, 2.5) / 2.5


def random_scene(height: int = 256, width: int = 512, seed: int = 0) -> torch.Tensor:
    """A landscape label map ``(H, W)`` of class indices: sky over mountains (rock, snow caps),
    a lake, ground of grass and sand, trees and a few brick houses. Seeded."""
    g = torch.Generator().manual_seed(seed)

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    c = {name: i for i, name in enumerate(CLASSES)}
    ys = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
    xs = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width)
    labels = torch.full((height, width), c["sky"], dtype=torch.long)
    horizon = height * uniform(0.35, 0.6)
    ridge = _smooth_noise((1, 1), int(uniform(3, 9)), (1, width), g)[0, 0, 0]        # (W,)
    ridge = (ridge - ridge.min()) / (ridge.max() - ridge.min() + 1e-6)
    peak = horizon - height * uniform(0.1, 0.35) * ridge
    mountain = ys >= peak
    labels[mountain] = c["rock"]
    snow_line = horizon - height * uniform(0.12, 0.25)
    labels[mountain & (ys < snow_line) & (ys < peak + height * uniform(0.03, 0.1))] = c["snow"]
    ground = ys >= horizon
    patches = _smooth_noise((1, 1), int(uniform(2, 6)), (height, width), g)[0, 0]
    labels[ground] = c["grass"]
    labels[ground & (patches > uniform(0.0, 0.5))] = c["sand"]
    if uniform(0, 1) < 0.7:   # a lake at the foot of the mountains
        shore = horizon + height * uniform(0.04, 0.25) * (1 + 0.5 * _smooth_noise((1, 1), 4, (1, width), g)[0, 0, 0])
        labels[ground & (ys < shore) & (patches < uniform(0.2, 0.8))] = c["water"]
    for _ in range(int(uniform(2, 12))):   # trees: blobs standing on the ground
        cy, cx = uniform(horizon - height * 0.05, height), uniform(0, width)
        r = height * uniform(0.02, 0.08)
        labels[(ys - cy) ** 2 / 1.6 + (xs - cx) ** 2 < r * r] = c["tree"]
    for _ in range(int(uniform(0, 3))):    # houses: rectangles on the ground
        top, left = uniform(horizon, height * 0.9), uniform(0, width * 0.9)
        labels[(ys >= top) & (ys < top + height * uniform(0.05, 0.15))
               & (xs >= left) & (xs < left + width * uniform(0.03, 0.1))] = c["brick"]
    return labels


def random_blobs(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A label map ``(H, W)`` of irregular blobs of every class (arbitrary layouts a user may paint)."""
    g = torch.Generator().manual_seed(seed)
    cells = int(torch.randint(2, 10, (), generator=g))
    fields = _smooth_noise((1, len(CLASSES)), cells, (height, width), g)[0]
    return fields.argmax(dim=0)


def default_scene(height: int = 256, width: int = 512) -> torch.Tensor:
    """The scene the demo and the editor start from."""
    return random_scene(height, width, seed=DEFAULT_SCENE_SEED)


#: the seed of ``default_scene`` (a lake, mountains with snow, trees)
DEFAULT_SCENE_SEED = 3
