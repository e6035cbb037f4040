"""User images and masks as the tensors the editor needs, and masks carried down to the latent."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def image_tensor(image, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A PIL image or a tensor in [-1, 1] as a ``(1, C, H, W)`` tensor in [-1, 1]."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        import numpy as np
        arr = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).copy())
        return (arr.permute(2, 0, 1)[None] / 127.5 - 1.0).to(dtype)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"an image must be a PIL image or a torch.Tensor in [-1, 1], got {type(image).__name__}")
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"an image tensor must be (C, H, W) or (1, C, H, W), got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"an image tensor must be floating point in [-1, 1], got {image.dtype} (uint8 images: "
                         "x / 127.5 - 1)")
    lo, hi = float(image.min()), float(image.max())
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"image values must be in [-1, 1], got [{lo:.3g}, {hi:.3g}]; map [0, 1] images with "
                         "x * 2 - 1 and [0, 255] with x / 127.5 - 1")
    return image.to(dtype)


def mask_tensor(mask, size: tuple[int, int]) -> torch.Tensor:
    """A boolean ``(H, W)`` mask from a bool tensor, or a PIL image (white = edited)."""
    if hasattr(mask, "convert") and hasattr(mask, "size"):
        import numpy as np
        mask = torch.from_numpy(np.asarray(mask.convert("L")) > 127)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"the mask must be a boolean (H, W) tensor or a PIL image, got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}; use mask > 0.5")
    if mask.dim() == 4 and mask.shape[:2] == (1, 1):
        mask = mask[0, 0]
    if tuple(mask.shape) != tuple(size):
        raise ValueError(f"the mask is {tuple(mask.shape)} but the image is {tuple(size)}; paint it at the image's size")
    return mask


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """The latent pixels whose image cell holds an edited pixel (max-pooling by the VAE's factor)."""
    fh, fw = mask.shape[0] // latent_size[0], mask.shape[1] // latent_size[1]
    if (fh * latent_size[0], fw * latent_size[1]) != tuple(mask.shape):
        raise ValueError(f"an image of {tuple(mask.shape)} does not down-sample evenly to the latent {latent_size}")
    return F.max_pool2d(mask[None, None].float(), (fh, fw))[0, 0] > 0
