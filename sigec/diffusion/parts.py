"""The Stable Diffusion parts the editor works with: the VAE (a named configuration, and its two
halves as modules sigec can compile) and the DDIM scheduler."""
from __future__ import annotations

from typing import Optional

import torch

#: Stable Diffusion 1.x's scheduler (``scheduler_config.json`` of the SD 1.x repositories)
SD_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                           steps_offset=1)

SD_VAE_CONFIGS = {
    # Stable Diffusion 1.x's AutoencoderKL: 8x down-sampling, 4 latent channels
    "sd1": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
    # its structure (four levels, 8x, mid-block attention) with few channels, for tests
    "sd-tiny": dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8),
}


def sd_vae(name: str = "sd-tiny", seed: int = 0) -> torch.nn.Module:
    """A diffusers ``AutoencoderKL`` from a named configuration (``SD_VAE_CONFIGS``), seeded, in eval mode."""
    from diffusers import AutoencoderKL

    if name not in SD_VAE_CONFIGS:
        raise ValueError(f"unknown AutoencoderKL configuration {name!r}; choose from {sorted(SD_VAE_CONFIGS)}")
    config = SD_VAE_CONFIGS[name]
    levels = len(config["block_out_channels"])
    torch.manual_seed(seed)
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                         latent_channels=4, scaling_factor=0.18215, **config).eval()


def ddim_scheduler(config: Optional[dict] = None):
    """A diffusers ``DDIMScheduler`` (deterministic, eta 0) with Stable Diffusion's configuration by default."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**(SD_SCHEDULER_CONFIG if config is None else config))


# -- the VAE halves as modules sigec can compile ---------------------------------------------------
class _VaeHalf(torch.nn.Module):
    """A wrapper around one half of an ``AutoencoderKL`` (the VAE itself is in eval mode)."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae
        self.training = False


class VaeEncoder(_VaeHalf):
    """``image in [-1, 1] -> scaled latent`` (the mean of the latent distribution times the scaling factor)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image).latent_dist.mean * self.vae.config.scaling_factor


class VaeDecoder(_VaeHalf):
    """``scaled latent -> image`` (about [-1, 1])."""

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample
