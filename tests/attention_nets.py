"""Small networks with attention in the forms sigec recognises: diffusers-style transformer blocks
(token reshape, LayerNorm, split heads, ``scaled_dot_product_attention``, GEGLU feed-forward,
cross-attention on a context) and the DDPM 16x16 attention block written by hand with ``bmm``
and ``softmax``."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class TokenAttention(nn.Module):
    """Multi-head attention on tokens ``(N, L, C)``, keys from ``context`` when given."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        n, _, c = x.shape
        ctx = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        q, k, v = (t.view(n, -1, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(n, -1, c))


class TransformerBlock(nn.Module):
    """As in diffusers' ``Transformer2DModel``: GroupNorm, 1x1 conv in, tokens, self-attention,
    cross-attention, GEGLU feed-forward, tokens back to an image, 1x1 conv out, residual."""

    def __init__(self, channels: int = 16, heads: int = 2, context_dim: int = 8):
        super().__init__()
        self.norm = nn.GroupNorm(4, channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(channels) for _ in range(3))
        self.attn1 = TokenAttention(channels, heads)
        self.attn2 = TokenAttention(channels, heads, context_dim)
        self.ff_in = nn.Linear(channels, 4 * channels)
        self.ff_out = nn.Linear(2 * channels, channels)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        t = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(n, h * w, c)
        t = self.attn1(self.norm1(t)) + t
        t = self.attn2(self.norm2(t), context) + t
        hidden, gate = self.ff_in(self.norm3(t)).chunk(2, dim=-1)
        t = self.ff_out(hidden * F.gelu(gate)) + t
        return self.proj_out(t.reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous()) + x


class TransformerNet(nn.Module):
    """conv -> transformer block -> conv; ``forward(x, context)``."""

    def __init__(self, channels: int = 16, heads: int = 2, context_dim: int = 8):
        super().__init__()
        self.conv_in = nn.Conv2d(3, channels, 3, padding=1)
        self.block = TransformerBlock(channels, heads, context_dim)
        self.conv_out = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.block(self.conv_in(x), context))


class HandWrittenAttention(nn.Module):
    """The DDPM 16x16 attention block: 1x1 convs to q, k, v, ``softmax(q k / sqrt(C)) v``, 1x1 conv
    out, residual. ``form`` writes the products with ``bmm``, ``@`` or two styles of ``einsum``."""

    FORMS = ("bmm", "matmul", "einsum", "einsum-keys-as-tokens")

    def __init__(self, channels: int = 16, form: str = "bmm"):
        super().__init__()
        self.form = form
        self.norm = nn.GroupNorm(4, channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).reshape(n, c, h * w).permute(0, 2, 1)  # (N, L, C)
        k = self.k(y).reshape(n, c, h * w)  # (N, C, L)
        v = self.v(y).reshape(n, c, h * w).permute(0, 2, 1)
        if self.form == "bmm":
            weights = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)
            out = torch.bmm(weights, v)
        elif self.form == "matmul":
            out = (q @ k / c ** 0.5).softmax(-1) @ v
        elif self.form == "einsum":
            weights = torch.einsum("bic,bcj->bij", q, k).mul(c ** -0.5).softmax(dim=-1)
            out = torch.einsum("bij,bjc->bic", weights, v)
        else:
            weights = torch.einsum("bic,bjc->bij", q, k.transpose(1, 2)).mul(c ** -0.5).softmax(dim=-1)
            out = torch.einsum("bij,bcj->bic", weights, v.transpose(1, 2))
        return x + self.proj_out(out.permute(0, 2, 1).reshape(n, c, h, w))


class HandWrittenNet(nn.Module):
    def __init__(self, channels: int = 16, form: str = "bmm"):
        super().__init__()
        self.conv_in = nn.Conv2d(3, channels, 3, padding=1)
        self.attn = HandWrittenAttention(channels, form)
        self.conv_out = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.attn(torch.relu(self.conv_in(x))))


class PooledTokens(nn.Module):
    """Tokens that meet an op the rewrite does not cover (a mean over tokens), beside attention."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.attn = TokenAttention(channels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        y = self.conv(x)
        t = y.permute(0, 2, 3, 1).reshape(n, h * w, -1)
        t = self.attn(t) + t.mean(dim=1, keepdim=True)
        return t.reshape(n, h, w, -1).permute(0, 3, 1, 2)
