"""Diffusers pipelines built from configurations with seeded random weights (nothing is downloaded),
for tests, examples and benchmarks: the models of ``sigec.models`` put into ``StableDiffusionImg2ImgPipeline``,
``StableDiffusionInpaintPipeline``, ``StableDiffusionControlNetPipeline`` and the SDXL img2img
pipeline. There is no tokenizer or text encoder: call them with ``prompt_embeds`` (and
``negative_prompt_embeds``; SDXL also ``pooled_prompt_embeds``), for example from ``prompt_embeddings``.
"""
from __future__ import annotations

from typing import Optional

import torch

PIPELINES = ("img2img", "inpaint", "controlnet", "sdxl-img2img")


def controlnet_from_unet(unet: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A diffusers ``ControlNetModel`` shaped after ``unet``, seeded. A trained ControlNet's output
    convolutions start at zero; here they get PyTorch's default initialization and the control image's encoder variance-keeping
    weights, so the control image matters."""
    from diffusers import ControlNetModel

    channels = unet.config.block_out_channels
    embedding = tuple(max(8, c // 4) for c in (channels[0] // 2, channels[0], channels[1], channels[-1]))
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding).eval()
    torch.manual_seed(seed)
    for module in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
        module.reset_parameters()  # PyTorch's default initialization instead of zeros
    # the control image's encoder: variance-keeping weights, so its eight layers do not fade the image out
    for module in controlnet.controlnet_cond_embedding.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            torch.nn.init.zeros_(module.bias)
    return controlnet


def sd_pipeline(kind: str = "img2img", unet: str = "sd-tiny", vae: str = "sd-tiny", scheduler=None, seed: int = 0):
    """A diffusers pipeline of ``kind`` (``PIPELINES``) with seeded random weights.

    Args:
        kind: ``"img2img"``, ``"inpaint"`` (the 9-channel inpainting UNet), ``"controlnet"``
            (text-to-image with a ControlNet) or ``"sdxl-img2img"``.
        unet, vae: configuration names of ``sigec.models.sd_unet`` and ``sigec.diffusion.sd_vae``
            (for ``"sdxl-img2img"``: ``"sdxl"`` or ``"sdxl-tiny"``; default ``"sdxl-tiny"``).
        scheduler: a diffusers scheduler (default: DDIM with Stable Diffusion's configuration).
    """
    import diffusers

    from sigec.diffusion.parts import ddim_scheduler, sd_vae
    from sigec.models import SD_UNET_CONFIGS, sd_unet

    if kind not in PIPELINES:
        raise ValueError(f"unknown pipeline kind {kind!r}; choose from {PIPELINES}")
    scheduler = scheduler if scheduler is not None else ddim_scheduler()
    common = dict(text_encoder=None, tokenizer=None, scheduler=scheduler)
    if kind == "sdxl-img2img":
        name = unet if unet.startswith("sdxl") else "sdxl-tiny"
        model = sd_unet(name, seed)
        return diffusers.StableDiffusionXLImg2ImgPipeline(vae=sd_vae(vae, seed), unet=model, text_encoder_2=None,
                                                         tokenizer_2=None, requires_aesthetics_score=False,
                                                         force_zeros_for_empty_prompt=False, **common)
    safety = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if kind == "inpaint":
        config = dict(SD_UNET_CONFIGS[unet], in_channels=9)
        from diffusers import UNet2DConditionModel

        torch.manual_seed(seed)
        model = UNet2DConditionModel(**config).eval()
        return diffusers.StableDiffusionInpaintPipeline(vae=sd_vae(vae, seed), unet=model, **common, **safety)
    model = sd_unet(unet, seed)
    if kind == "controlnet":
        return diffusers.StableDiffusionControlNetPipeline(vae=sd_vae(vae, seed), unet=model,
                                                           controlnet=controlnet_from_unet(model, seed), **common,
                                                           **safety)
    return diffusers.StableDiffusionImg2ImgPipeline(vae=sd_vae(vae, seed), unet=model, **common, **safety)


def prompt_embeddings(unet: torch.nn.Module, tokens: int = 77, seed: int = 0,
                      pooled_dim: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Seeded ``prompt_embeds`` and ``negative_prompt_embeds`` for ``unet`` (what a text encoder would
    give), plus ``pooled_prompt_embeds`` and ``negative_pooled_prompt_embeds`` of ``pooled_dim`` for SDXL."""
    generator = torch.Generator().manual_seed(seed)
    dim = unet.config.cross_attention_dim
    out = {"prompt_embeds": torch.randn(1, tokens, dim, generator=generator),
           "negative_prompt_embeds": torch.randn(1, tokens, dim, generator=generator)}
    if pooled_dim is not None:
        out["pooled_prompt_embeds"] = torch.randn(1, pooled_dim, generator=generator)
        out["negative_pooled_prompt_embeds"] = torch.randn(1, pooled_dim, generator=generator)
    return out
