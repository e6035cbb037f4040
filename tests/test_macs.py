"""MACs in ``engine.report()`` agree with an independent count.

The independent count is ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2 = MACs): on the
dense model for ``report.dense_macs``, and on a direct call of ``engine.incremental`` - the
graph that convolves the gathered blocks - for ``report.incremental_macs``. The acceptance
tolerance is 5%.

FlopCounterMode is extended in one place: torch 2.13 has no formula for
``aten._scaled_dot_product_flash_attention_for_cpu``, the kernel ``scaled_dot_product_attention``
dispatches to on CPU, so attention would count as zero. ``_CPU_SDPA`` adds the standard formula;
``test_counter_sees_every_mac_op`` checks that no other MAC-doing op goes uncounted. The
``sigec::*`` runtime ops are opaque to the counter; they only gather, scatter and apply
per-channel affines (no multiply-accumulate reductions), so counting them as zero is right.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, flop_registry
from torch.utils._python_dispatch import TorchDispatchMode

import sigec

aten = torch.ops.aten
TOLERANCE = 0.05
MASK_FRACTION = 0.05


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of attention: Q @ K^T and P @ V, two FLOPs per multiply-accumulate."""
    *batch, lq, dqk = query_shape
    lk, dv = key_shape[-2], value_shape[-1]
    return 2 * math.prod(batch) * lq * lk * (dqk + dv)


_CPU_SDPA = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def counted_macs(fn, *args) -> int:
    """MACs of ``fn(*args)`` according to FlopCounterMode (plus the CPU attention formula)."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_SDPA)
    with counter, torch.no_grad():
        fn(*args)
    return counter.get_total_flops() // 2


class _OpLog(TorchDispatchMode):
    """Records the overload packet of every op dispatched (the ones FlopCounterMode sees)."""

    def __init__(self):
        super().__init__()
        self.ops: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func._overloadpacket)
        return func(*args, **(kwargs or {}))


# Name fragments of aten ops that do multiply-accumulate reductions.
_MAC_NAME_PARTS = ("conv", "mm", "linear", "matmul", "attention", "einsum", "addmv", "mv", "dot")


def uncounted_mac_ops(fn, *args) -> set[str]:
    """aten ops run by ``fn(*args)`` that look like MAC work but have no flop formula."""
    log = _OpLog()
    with log, torch.no_grad():
        fn(*args)
    known = set(flop_registry) | set(_CPU_SDPA)
    return {str(op) for op in log.ops
            if str(op).startswith("aten.") and op not in known
            and any(part in str(op).split(".")[1] for part in _MAC_NAME_PARTS)}


def ellipse(h: int, w: int, fraction: float) -> torch.Tensor:
    """An off-centre ellipse (aspect 1.5) covering about ``fraction`` of an ``h x w`` image."""
    ry = math.sqrt(fraction * h * w / (1.5 * math.pi))
    cy, cx = 0.38 * h, 0.6 * w
    ys = torch.arange(h, dtype=torch.float64)[:, None] + 0.5
    xs = torch.arange(w, dtype=torch.float64)[None, :] + 0.5
    return ((ys - cy) / ry) ** 2 + ((xs - cx) / (1.5 * ry)) ** 2 <= 1.0


def incremental_inputs(engine, flat: list, mask: torch.Tensor) -> list:
    """The arguments ``Engine`` passes to ``engine.incremental`` for ``flat`` inputs and ``mask``."""
    assert len(engine.store) == 1, "expected exactly one recorded slot"
    slot = engine.store.get(engine.store.keys()[0])
    stats = engine.mask_stats(mask)
    indices = [stats["blocks"][key] for key in engine.signature.blocks]
    pixel = [stats["masks"][m][None, None] for m in engine.signature.pixel_masks]
    return [*flat, *slot.caches, *indices, *pixel]


def assert_close_count(reported: int, counted: int, what: str) -> None:
    rel = abs(reported - counted) / counted
    assert rel <= TOLERANCE, (f"{what}: report says {reported:,} MACs, FlopCounterMode counts "
                              f"{counted:,} ({rel:.2%} apart, tolerance {TOLERANCE:.0%})")


# ---------------------------------------------------------------------------------------------
# models


class SmallConvNet(nn.Module):
    """Encoder-decoder with the ops sigec must handle: strided conv, group norm, SiLU,
    nearest up-sampling, a skip concatenation, 1x1 convs and a residual add."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.inp = nn.Conv2d(3, c, 3, padding=1)
        self.norm1 = nn.GroupNorm(4, c)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.norm2 = nn.GroupNorm(4, 2 * c)
        self.mid = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.up = nn.Conv2d(2 * c, c, 3, padding=1)
        self.fuse = nn.Conv2d(2 * c, c, 1)
        self.out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        skip = h
        h = self.down(F.silu(self.norm1(h)))
        h = h + self.mid(F.silu(self.norm2(h)))
        h = self.up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.fuse(torch.cat([h, skip], dim=1)) + skip
        return self.out(F.silu(h))


@pytest.fixture(scope="module")
def unet_case():
    """church-small UNet, compiled, recorded, and edited once with a ~5% ellipse."""
    from sigec.models import ddpm_unet

    model = ddpm_unet("church-small")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 64, 64, generator=g)
    t = torch.tensor([500])
    engine = sigec.compile(model, (x, t), policy="sige")
    mask = ellipse(64, 64, MASK_FRACTION)
    x_edit = torch.where(mask, torch.randn(x.shape, generator=g), x)
    engine(x, t)
    y = engine(x_edit, t, mask=mask).sample
    return dict(model=model, engine=engine, x=x, t=t, x_edit=x_edit, mask=mask, flat=[x_edit, t], y=y)


def _conv_case(policy: str) -> dict:
    torch.manual_seed(0)
    model = SmallConvNet().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 64, 64, generator=g)
    engine = sigec.compile(model, (x,), policy=policy)
    mask = ellipse(64, 64, MASK_FRACTION)
    x_edit = torch.where(mask, torch.randn(x.shape, generator=g), x)
    engine(x)
    y = engine(x_edit, mask=mask)
    return dict(model=model, engine=engine, x=x, x_edit=x_edit, mask=mask, flat=[x_edit], y=y)


@pytest.fixture(scope="module", params=["sige", "exact"])
def conv_case(request):
    return _conv_case(request.param)


# ---------------------------------------------------------------------------------------------
# tests


def test_mask_is_about_five_percent():
    frac = float(ellipse(64, 64, MASK_FRACTION).float().mean())
    assert abs(frac - MASK_FRACTION) < 0.005


def _assert_all_counted(case: dict) -> None:
    dense_args = (case["x"], case["t"]) if "t" in case else (case["x"],)
    assert uncounted_mac_ops(case["model"], *dense_args) == set()
    inputs = incremental_inputs(case["engine"], case["flat"], case["mask"])
    assert uncounted_mac_ops(case["engine"].incremental, *inputs) == set()


def test_counter_sees_every_mac_op_unet(unet_case):
    """Guard for the tests below: no MAC-doing aten op escapes FlopCounterMode."""
    _assert_all_counted(unet_case)


def test_counter_sees_every_mac_op_conv_net(conv_case):
    _assert_all_counted(conv_case)


def test_unet_dense_macs(unet_case):
    report = unet_case["engine"].report(mask=unet_case["mask"])
    counted = counted_macs(unet_case["model"], unet_case["x"], unet_case["t"])
    assert_close_count(report.dense_macs, counted, "church-small dense")


def test_unet_incremental_macs(unet_case):
    engine = unet_case["engine"]
    inputs = incremental_inputs(engine, unet_case["flat"], unet_case["mask"])
    # The reconstructed call is the one the engine made: same output.
    out = engine.incremental(*inputs)
    torch.testing.assert_close(out[0], unet_case["y"], rtol=0, atol=0)
    report = engine.report(mask=unet_case["mask"])
    counted = counted_macs(engine.incremental, *inputs)
    assert_close_count(report.incremental_macs, counted, "church-small incremental")
    assert report.incremental_macs < report.dense_macs
    assert counted < counted_macs(unet_case["model"], unet_case["x"], unet_case["t"])


def test_conv_net_dense_macs(conv_case):
    report = conv_case["engine"].report(mask=conv_case["mask"])
    counted = counted_macs(conv_case["model"], conv_case["x"])
    assert_close_count(report.dense_macs, counted, "conv net dense")


def test_conv_net_incremental_macs(conv_case):
    engine = conv_case["engine"]
    inputs = incremental_inputs(engine, conv_case["flat"], conv_case["mask"])
    out = engine.incremental(*inputs)
    torch.testing.assert_close(out[0], conv_case["y"], rtol=0, atol=0)
    report = engine.report(mask=conv_case["mask"])
    counted = counted_macs(engine.incremental, *inputs)
    assert_close_count(report.incremental_macs, counted, "conv net incremental")
    assert report.incremental_macs < report.dense_macs
    # Every conv of this net is local, so a 5% edit must leave most of the work undone.
    assert report.incremental_macs < 0.5 * report.dense_macs


def test_report_last_edit_equals_explicit_mask(conv_case):
    """``report()`` after the edit (last_stats) and ``report(mask=...)`` count the same MACs."""
    engine = conv_case["engine"]
    engine(conv_case["x_edit"], mask=conv_case["mask"])
    assert engine.report().incremental_macs == engine.report(mask=conv_case["mask"]).incremental_macs
