"""Random convolutional networks for property tests, drawn with hypothesis.

A network is a list of layer descriptors interpreted by ``RandomNet.forward``; every tensor the
network produced stays available to later residual adds and channel concatenations.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

ACTIVATIONS = ("relu", "silu", "sigmoid", "tanh", "gelu", "leaky_relu", "hand_silu")


@dataclasses.dataclass(frozen=True)
class Layer:
    kind: str
    params: tuple = ()


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "hand_silu":
        return x * torch.sigmoid(x)
    if name == "leaky_relu":
        return F.leaky_relu(x, 0.2)
    return getattr(F, name)(x) if name != "sigmoid" and name != "tanh" else getattr(torch, name)(x)


class RandomNet(nn.Module):
    def __init__(self, layers: list[Layer], in_channels: int):
        super().__init__()
        self.layers = layers
        self.mods = nn.ModuleList()
        c = in_channels
        self.channels = [c]
        chans = [c]  # channels of every produced tensor, in order
        for layer in layers:
            if layer.kind == "conv":
                cout, k, s, p, d, g = layer.params
                self.mods.append(nn.Conv2d(chans[-1], cout, k, s, p, d, groups=g))
                chans.append(cout)
            elif layer.kind == "bn":
                bn = nn.BatchNorm2d(chans[-1])
                bn.running_mean.normal_(0, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.data.normal_(1, 0.2)
                bn.bias.data.normal_(0, 0.2)
                self.mods.append(bn)
                chans.append(chans[-1])
            elif layer.kind == "channels_last":
                self.mods.append(nn.Sequential(nn.LayerNorm(chans[-1]), nn.Linear(chans[-1], chans[-1])))
                chans.append(chans[-1])
            elif layer.kind == "cat":
                self.mods.append(nn.Identity())
                chans.append(chans[-1] + chans[layer.params[0]])
            else:
                self.mods.append(nn.Identity())
                chans.append(chans[-1])
        self.out_channels = chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = [x]
        for layer, mod in zip(self.layers, self.mods):
            h = values[-1]
            kind, p = layer.kind, layer.params
            if kind in ("conv", "bn"):
                h = mod(h)
            elif kind == "channels_last":  # LayerNorm + Linear per pixel, ConvNeXt style
                h = mod(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            elif kind == "act":
                h = _act(p[0], h)
            elif kind == "affine":
                h = h * p[0] + p[1]
            elif kind == "add":
                h = h + values[p[0]]
            elif kind == "cat":
                h = torch.cat([h, values[p[0]]], dim=1)
            elif kind == "up":
                h = F.interpolate(h, scale_factor=2.0, mode=p[0])
            elif kind == "avgpool":
                h = F.avg_pool2d(h, 2)
            elif kind == "maxpool":
                h = F.max_pool2d(h, 3, 2, 1)
            elif kind == "down_bilinear":
                h = F.interpolate(h, scale_factor=0.5, mode="bilinear")
            elif kind == "pad":
                h = F.pad(h, (p[1],) * 4, mode=p[0])
            values.append(h)
        return values[-1]


@st.composite
def random_nets(draw, max_layers: int = 6):
    """``(model, input)``: a random conv net over a square image and a matching input."""
    size = draw(st.sampled_from([12, 16, 20, 24]))
    c = draw(st.integers(1, 4))
    shapes = [(c, size)]  # (channels, resolution) of every produced tensor
    layers: list[Layer] = []
    for _ in range(draw(st.integers(1, max_layers))):
        ch, res = shapes[-1]
        options = ["conv", "conv", "act", "affine", "bn", "channels_last"]
        same = [i for i, (c2, r2) in enumerate(shapes[:-1]) if r2 == res]
        if [i for i in same if shapes[i][0] == ch]:
            options.append("add")
        if same:
            options.append("cat")
        if res <= 24:
            options.append("up")
        if res >= 8 and res % 2 == 0:
            options += ["avgpool", "maxpool", "down_bilinear"]
        if res >= 6:
            options.append("pad")
        kind = draw(st.sampled_from(options))
        if kind == "conv":
            k = draw(st.sampled_from([1, 3, 5]))
            s = draw(st.sampled_from([1, 1, 2]))
            d = draw(st.sampled_from([1, 1, 2]))
            p = draw(st.integers(0, d * (k - 1) // 2 + 1))
            out_res = (res + 2 * p - d * (k - 1) - 1) // s + 1
            if out_res < 4:
                k, s, d, p, out_res = 1, 1, 1, 0, res
            g = draw(st.sampled_from([g for g in (1, 2, ch) if ch % g == 0]))
            cout = g * draw(st.integers(1, 3))
            layers.append(Layer("conv", (cout, k, s, p, d, g)))
            shapes.append((cout, out_res))
        elif kind == "act":
            layers.append(Layer("act", (draw(st.sampled_from(ACTIVATIONS)),)))
            shapes.append((ch, res))
        elif kind == "affine":
            layers.append(Layer("affine", (draw(st.floats(-2, 2)), draw(st.floats(-1, 1)))))
            shapes.append((ch, res))
        elif kind in ("bn", "channels_last"):
            layers.append(Layer(kind))
            shapes.append((ch, res))
        elif kind == "add":
            idx = draw(st.sampled_from([i for i in same if shapes[i][0] == ch]))
            layers.append(Layer("add", (idx,)))
            shapes.append((ch, res))
        elif kind == "cat":
            idx = draw(st.sampled_from(same))
            layers.append(Layer("cat", (idx,)))
            shapes.append((ch + shapes[idx][0], res))
        elif kind == "up":
            layers.append(Layer("up", (draw(st.sampled_from(["nearest", "bilinear"])),)))
            shapes.append((ch, res * 2))
        elif kind in ("avgpool", "maxpool", "down_bilinear"):
            layers.append(Layer(kind))
            shapes.append((ch, res // 2))
        else:
            mode = draw(st.sampled_from(["constant", "reflect", "replicate"]))
            amount = draw(st.integers(1, 2))
            layers.append(Layer("pad", (mode, amount)))
            shapes.append((ch, res + 2 * amount))
    seed = draw(st.integers(0, 2 ** 16))
    torch.manual_seed(seed)
    model = RandomNet(layers, c).eval()
    x = torch.randn(draw(st.sampled_from([1, 1, 2])), c, size, size)
    return model, x


@st.composite
def random_masks(draw, size: int):
    """An H x W boolean mask: rectangles, scattered pixels, or empty."""
    kind = draw(st.sampled_from(["rect", "rect", "pixels", "empty", "full"]))
    mask = torch.zeros(size, size, dtype=torch.bool)
    if kind == "rect":
        for _ in range(draw(st.integers(1, 2))):
            y0, x0 = draw(st.integers(0, size - 1)), draw(st.integers(0, size - 1))
            h, w = draw(st.integers(1, size // 2)), draw(st.integers(1, size // 2))
            mask[y0:y0 + h, x0:x0 + w] = True
    elif kind == "pixels":
        for _ in range(draw(st.integers(1, 4))):
            mask[draw(st.integers(0, size - 1)), draw(st.integers(0, size - 1))] = True
    elif kind == "full":
        mask[:] = True
    return mask
