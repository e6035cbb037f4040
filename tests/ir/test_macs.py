"""MACs in ``engine.report()`` agree with an independent count.

The independent count is ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2 = MACs): on the
dense model for ``report.dense_macs``, and on a direct call of ``engine.incremental`` - the
graph that convolves the gathered blocks - for ``report.incremental_macs``. The acceptance
tolerance is 5%.

FlopCounterMode is extended in one place: torch 2.13 has no formula for
``aten._scaled_dot_product_flash_attention_for_cpu``, the kernel ``scaled_dot_product_attention``
dispatches to on CPU, so attention would count as zero. ``_CPU_SDPA`` adds the standard formula;
``test_counter_sees_every_mac_op`` checks that no other MAC-doing op goes uncounted. The
``sigec::*`` runtime ops are opaque to the counter (it sees the custom op, not what runs inside);
they only gather, scatter and apply per-channel affines (no multiply-accumulate reductions), so
counting them as zero is right - and any other non-aten op fails that check.
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
from sigec.frontends.edits import ellipse_mask

aten = torch.ops.aten
TOLERANCE = 0.05
MASK_FRACTION = 0.05


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of attention: Q @ K^T and P @ V, two FLOPs per multiply-accumulate."""
    *batch, lq, dqk = query_shape
    lk, dv = key_shape[-2], value_shape[-1]
    return 2 * math.prod(batch) * lq * lk * (dqk + dv)


_CPU_SDPA = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


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
# The sigec runtime ops read in runtime/ops.py: indexing, copies and per-channel affines only.
# Any other non-aten op (say a future fused sparse conv) is reported, since the counter would
# see it as zero.
_DATA_MOVEMENT_OPS = {f"sigec.{name}" for name in
                      ("gather", "gather_cat", "scatter", "scatter_gather", "scatter_", "scatter_gather_", "residual_add", "affine_act",
                       "tile_blocks", "norm_affine")}


def _uncounted(op) -> bool:
    name = str(op)
    if not name.startswith("aten."):
        return name not in _DATA_MOVEMENT_OPS
    return any(part in name.split(".")[1] for part in _MAC_NAME_PARTS)


def count_macs(fn, *args) -> tuple[int, set[str], object]:
    """Run ``fn(*args)`` once; return its MACs according to FlopCounterMode (plus the CPU
    attention formula), the aten ops that look like MAC work but have no flop formula, and
    ``fn``'s result."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_SDPA)
    log = _OpLog()
    # The log is the inner mode: it sees each op first and hands it on to the counter.
    with counter, log, torch.no_grad():
        result = fn(*args)
    known = set(flop_registry) | set(_CPU_SDPA)
    uncounted = {str(op) for op in log.ops if op not in known and _uncounted(op)}
    return counter.get_total_flops() // 2, uncounted, result


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
    nearest up-sampling, a skip concatenation, 1x1 convs, a residual add and a channels-last
    LayerNorm + Linear block (ConvNeXt style)."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.inp = nn.Conv2d(3, c, 3, padding=1)
        self.norm1 = nn.GroupNorm(4, c)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.norm2 = nn.GroupNorm(4, 2 * c)
        self.mid = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.up = nn.Conv2d(2 * c, c, 3, padding=1)
        self.fuse = nn.Conv2d(2 * c, c, 1)
        self.ln = nn.LayerNorm(c)
        self.pw = nn.Linear(c, c)
        self.out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        skip = h
        h = self.down(F.silu(self.norm1(h)))
        h = h + self.mid(F.silu(self.norm2(h)))
        h = self.up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.fuse(torch.cat([h, skip], dim=1)) + skip
        h = h + self.pw(self.ln(h.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.out(F.silu(h))


def _measure(model, engine, x_args: tuple, flat_edit: list, mask: torch.Tensor, y) -> dict:
    """Count the dense model on ``x_args`` and the incremental graph on the edit, once each.

    ``y`` is what the engine returned for the edit: the direct call must reproduce it, which
    shows the reconstructed arguments are the ones the engine used.
    """
    dense, dense_missing, _ = count_macs(model, *x_args)
    inputs = incremental_inputs(engine, flat_edit, mask)
    incr, incr_missing, out = count_macs(engine.incremental, *inputs)
    torch.testing.assert_close(out[0], y, rtol=0, atol=0)
    return dict(report=engine.report(mask=mask), dense=dense, incremental=incr,
                uncounted=dense_missing | incr_missing)


def _unet_case() -> dict:
    """church-small UNet, compiled, recorded, edited once with a ~5% ellipse, and counted."""
    from sigec.models import ddpm_unet

    model = ddpm_unet("church-small")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 64, 64, generator=g)
    t = torch.tensor([500])
    engine = sigec.compile(model, (x, t), policy="sige")
    mask = ellipse_mask(64, 64, MASK_FRACTION, centre=(0.6, 0.38))
    x_edit = torch.where(mask, torch.randn(x.shape, generator=g), x)
    engine(x, t)
    y = engine(x_edit, t, mask=mask).sample
    case = _measure(model, engine, (x, t), [x_edit, t], mask, y)
    case.update(engine=engine, edit=(x_edit, t), mask=mask)
    return case


def _conv_case(policy: str) -> dict:
    """The hand-written conv net, compiled with ``policy``, edited with a ~5% ellipse, counted."""
    torch.manual_seed(0)
    model = SmallConvNet().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 64, 64, generator=g)
    engine = sigec.compile(model, (x,), policy=policy)
    mask = ellipse_mask(64, 64, MASK_FRACTION, centre=(0.6, 0.38))
    x_edit = torch.where(mask, torch.randn(x.shape, generator=g), x)
    engine(x)
    y = engine(x_edit, mask=mask)
    case = _measure(model, engine, (x,), [x_edit], mask, y)
    case.update(engine=engine, edit=(x_edit,), mask=mask)
    return case


@pytest.fixture(scope="module", params=["church-small", "convnet-sige", "convnet-exact"])
def case(request) -> dict:
    if request.param == "church-small":
        return _unet_case()
    return _conv_case(request.param.split("-")[1])


# ---------------------------------------------------------------------------------------------
# tests


def test_mask_is_about_five_percent():
    frac = float(ellipse_mask(64, 64, MASK_FRACTION, centre=(0.6, 0.38)).float().mean())
    assert abs(frac - MASK_FRACTION) < 0.005


def test_counter_sees_every_mac_op(case):
    """Guard for the comparisons: no MAC-doing aten op escapes FlopCounterMode (it would count 0)."""
    assert case["uncounted"] == set()


def test_dense_macs(case):
    assert_close_count(case["report"].dense_macs, case["dense"], "dense")


def test_incremental_macs(case):
    report = case["report"]
    assert report.incremental_macs is not None
    assert_close_count(report.incremental_macs, case["incremental"], "incremental")
    assert report.incremental_macs < report.dense_macs
    assert case["incremental"] < case["dense"]


def test_small_edit_saves_most_work(case):
    # A 5% edit reaches well under half of either network (church-small: about a quarter).
    assert case["report"].incremental_macs < 0.5 * case["report"].dense_macs


def test_report_last_edit_equals_explicit_mask(case):
    """``report()`` after an edit (from last_stats) counts what ``report(mask=...)`` counts."""
    engine = case["engine"]
    engine(*case["edit"], mask=case["mask"])
    assert engine.report().incremental_macs == case["report"].incremental_macs
