"""Factories for ``sigec dump`` / ``sigec bench`` tests: ``tests.cli_targets:NAME``.

A factory takes no arguments and returns ``(model, args)`` or ``(model, args, kwargs)``.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn


@functools.lru_cache(maxsize=None)
def _church_small() -> nn.Module:
    from sigec.models import ddpm_unet

    return ddpm_unet("church-small")


def church_small():
    """The church-256-structured UNet at 64x64 (cached: building it imports diffusers)."""
    g = torch.Generator().manual_seed(0)
    return _church_small(), (torch.randn(1, 3, 64, 64, generator=g), torch.tensor([500]))


class TinyConvNet(nn.Module):
    def __init__(self, norm: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8) if norm else nn.Identity()
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x, scale=None):
        h = self.conv2(torch.nn.functional.silu(self.norm(self.conv1(x))))
        h = torch.nn.functional.interpolate(self.conv3(h), scale_factor=2.0, mode="nearest")
        return h if scale is None else h * scale


def tiny():
    """A small conv net at 32x32."""
    torch.manual_seed(0)
    return TinyConvNet().eval(), (torch.randn(1, 3, 32, 32),)


def tiny_with_kwargs():
    """The small conv net without its norm (so ``exact`` is lossless), with a keyword input.

    (The keyword is a 1-element tensor: a 0-dim one trips ``runtime.cache.fingerprint``.)
    """
    torch.manual_seed(0)
    return TinyConvNet(norm=False).eval(), (torch.randn(1, 3, 32, 32),), {"scale": torch.tensor([2.0])}


def not_a_pair():
    return "model"


def raises():
    raise RuntimeError("factory exploded")


NOT_CALLABLE = 3
