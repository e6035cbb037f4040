"""Training targets of the landscape generator, made from photos that install with the package
registries (scikit-image's and scikit-learn's bundled images) and procedural layouts.

Each class's texture is a *Gaussian texture* of a photo region (the asymptotic discrete spot
noise of Galerne, Gousseau and Morel, 2011): the noise map convolved with a kernel whose power
spectrum is the region's average over many small patches, plus the region's mean colour. The
target is therefore a fixed, local function of the label map and the noise map, which a network
with a 13x13 receptive field can learn exactly with an L1 loss (a target that the inputs did not
determine would be learnt as its flat mean colour), and it has the colours and grain of the photo.

``textures()`` builds the bank once (about a second); ``render_target(labels, noise, bank)``
draws the target picture of any label map.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sigec.models.landscape import CLASSES

#: side of the texture kernels: at most the generator's 13x13 receptive field
KERNEL = 11


@dataclass(frozen=True)
class Source:
    """Where a class's texture comes from: a photo region, scaled, optionally tinted (grey photos)."""

    image: str                  # "skimage:<name>" or "sklearn:<file name>"
    box: tuple[float, float, float, float]   # top, left, bottom, right as fractions of the photo
    scale: float                # resize factor applied before sampling patches
    tint: "tuple[float, float, float] | None" = None   # mean colour (0-1) for a grey photo
    contrast: float = 1.0       # multiplies the texture's deviation from its mean


SOURCES = {
    "sky": Source("sklearn:china.jpg", (0.0, 0.0, 0.12, 0.35), 0.5, contrast=0.7),
    "water": Source("skimage:coffee", (0.0, 0.0, 0.0, 0.0), 1.0),      # procedural (see _water)
    "grass": Source("skimage:grass", (0.0, 0.0, 1.0, 1.0), 0.3, tint=(0.36, 0.62, 0.2), contrast=0.8),
    "tree": Source("skimage:grass", (0.0, 0.0, 1.0, 1.0), 0.6, tint=(0.17, 0.35, 0.14), contrast=1.4),
    "rock": Source("skimage:gravel", (0.0, 0.0, 1.0, 1.0), 0.25, tint=(0.47, 0.46, 0.44), contrast=1.0),
    "sand": Source("skimage:gravel", (0.0, 0.0, 1.0, 1.0), 0.6, tint=(0.86, 0.77, 0.55), contrast=0.35),
    "brick": Source("skimage:brick", (0.0, 0.0, 1.0, 1.0), 0.2, tint=(0.62, 0.3, 0.22), contrast=1.0),
    "snow": Source("skimage:moon", (0.2, 0.2, 0.8, 0.8), 0.5, tint=(0.93, 0.94, 0.97), contrast=0.3),
}


@dataclass(frozen=True)
class TextureBank:
    """Per class: mean colour ``(K, 3)`` in [-1, 1] and texture kernels ``(K, 3, KERNEL, KERNEL)``."""

    means: torch.Tensor
    kernels: torch.Tensor


def _photo(spec: str) -> np.ndarray:
    """A bundled photo as float ``(H, W, 3)`` or ``(H, W)`` in [0, 1]."""
    kind, name = spec.split(":", 1)
    if kind == "skimage":
        import skimage.data

        image = getattr(skimage.data, name)()
    else:
        from sklearn.datasets import load_sample_image

        image = load_sample_image(name)
    return np.asarray(image, dtype=np.float32) / 255.0


def _region(source: Source) -> torch.Tensor:
    """The source region as ``(3, h, w)`` in [0, 1], scaled, grey photos tinted."""
    image = _photo(source.image)
    h, w = image.shape[:2]
    top, left, bottom, right = source.box
    crop = image[int(top * h):int(bottom * h), int(left * w):int(right * w)]
    t = torch.from_numpy(np.ascontiguousarray(crop))
    t = t.permute(2, 0, 1) if t.dim() == 3 else t[None]
    t = F.interpolate(t[None], scale_factor=source.scale, mode="area")[0]
    if source.tint is not None:   # grey photo: its deviations become brightness around the tint
        grey = t.mean(dim=0, keepdim=True)
        t = torch.tensor(source.tint)[:, None, None] * (grey / grey.mean())
    return t


def _spot_kernel(region: torch.Tensor, patches: int = 256, seed: int = 0) -> torch.Tensor:
    """``(3, KERNEL, KERNEL)``: zero-phase kernels with the region's average patch power spectrum
    per channel, scaled so that the texture's variance is the patches' variance."""
    g = torch.Generator().manual_seed(seed)
    _, h, w = region.shape
    ys = torch.randint(0, h - KERNEL + 1, (patches,), generator=g)
    xs = torch.randint(0, w - KERNEL + 1, (patches,), generator=g)
    stack = torch.stack([region[:, y:y + KERNEL, x:x + KERNEL] for y, x in zip(ys.tolist(), xs.tolist())])
    stack = stack - stack.mean(dim=(2, 3), keepdim=True)
    window = torch.hann_window(KERNEL + 2, periodic=False)[1:-1]
    power = torch.fft.fft2(stack * (window[:, None] * window[None, :])).abs().pow(2).mean(dim=0)
    kernel = torch.fft.fftshift(torch.fft.ifft2(power.sqrt()).real, dim=(-2, -1))
    variance = stack.pow(2).mean(dim=(0, 2, 3))
    return kernel * (variance / kernel.pow(2).sum(dim=(1, 2))).sqrt()[:, None, None]


def _water() -> tuple[torch.Tensor, torch.Tensor]:
    """Procedural water: deep blue with horizontal ripples (a kernel long across, short down)."""
    r = torch.arange(KERNEL, dtype=torch.float32) - KERNEL // 2
    y, x = r[:, None], r[None, :]
    ripple = torch.exp(-(x / 3.5) ** 2 - (y / 0.9) ** 2) - 0.6 * torch.exp(-(x / 3.5) ** 2 - ((y.abs() - 2) / 0.9) ** 2)
    ripple = ripple / ripple.pow(2).sum().sqrt()
    colour = torch.tensor([0.17, 0.36, 0.62])
    deviation = torch.tensor([0.09, 0.11, 0.12])
    return colour, deviation[:, None, None] * ripple


def textures() -> TextureBank:
    """The texture bank of every class, from the bundled photos (deterministic)."""
    means, kernels = [], []
    for i, name in enumerate(CLASSES):
        source = SOURCES[name]
        if name == "water":
            mean, kernel = _water()
        else:
            region = _region(source)
            mean = region.mean(dim=(1, 2))
            kernel = _spot_kernel(region, seed=i) * source.contrast
        means.append(mean * 2 - 1)           # [0, 1] -> [-1, 1]
        kernels.append(kernel * 2)
    return TextureBank(torch.stack(means), torch.stack(kernels))


def render_target(labels: torch.Tensor, noise: torch.Tensor, bank: TextureBank) -> torch.Tensor:
    """The target picture ``(N, 3, H, W)`` in [-1, 1] of one-hot ``labels`` ``(N, K, H, W)`` and
    ``noise`` ``(N, 1, H, W)``: each pixel takes its class's texture (the noise, zero-padded at the
    canvas border, convolved with the class kernel) plus the class's mean colour."""
    k = bank.kernels.shape[0]
    filtered = F.conv2d(noise, bank.kernels.reshape(k * 3, 1, KERNEL, KERNEL), padding=KERNEL // 2)
    filtered = filtered.reshape(noise.shape[0], k, 3, *noise.shape[2:]) + bank.means[None, :, :, None, None]
    return (labels[:, :, None] * filtered).sum(dim=1).clamp(-1, 1)
