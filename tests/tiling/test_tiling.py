"""Tiled execution (sigec.tiling): equal to the untiled model, bounded regions, clear errors."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import sigec
from sigec.ir import meta_keys as K
from sigec.ir.macs import macs_per_output_pixel
from sigec.frontends.measure import psnr
from sigec.tiling import TiledModule, TilingError, compile_tiled
from tests.random_nets import random_nets


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    scale = max(1.0, float(b.abs().max()))
    err = float((a - b).abs().max())
    assert err <= tol * scale, f"max error {err} exceeds {tol} x {scale}"


def _untiled(model, *args):
    with torch.no_grad():
        return model(*args)


# ---------------------------------------------------------------------------------------------
# local networks: any kernels, strides, dilations, resampling, pads and skip concatenations


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(net=random_nets(max_layers=6), rows=st.integers(1, 4), cols=st.integers(1, 4))
def test_random_conv_nets_equal_the_untiled_model(net, rows, cols):
    model, x = net
    ref = _untiled(model, x)
    assume(ref.shape[-2] >= rows and ref.shape[-1] >= cols)
    try:
        tiled = compile_tiled(model, (x,), tiles=(rows, cols), whole_below_bytes=0)
    except TilingError as exc:
        assume("smaller than the halo" not in str(exc))  # a valid refusal, checked in its own test
        raise
    _close(tiled(x), ref)


class GroupNormNet(nn.Module):
    """Down- and up-sampling with group norms at three resolutions and a skip concatenation."""

    def __init__(self, norm: str = "group"):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 16, 3, padding=1)
        self.n1 = nn.GroupNorm(4, 16) if norm == "group" else nn.InstanceNorm2d(16, affine=True)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.n2 = nn.GroupNorm(8, 32)
        self.mid = nn.Conv2d(32, 32, 3, padding=2, dilation=2)
        self.up = nn.Conv2d(32, 16, 3, padding=1)
        self.n3 = nn.GroupNorm(2, 32)
        self.out = nn.Conv2d(32, 3, 5, padding=2)

    def forward(self, x):
        h0 = F.silu(self.n1(self.conv_in(x)))
        h = F.silu(self.n2(self.down(h0)))
        h = self.mid(h) + h
        h = self.up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = torch.cat([h, h0], dim=1)
        return self.out(F.silu(self.n3(h)))


@pytest.mark.parametrize("norm, grid", [("group", dict(tiles=(3, 5))), ("instance", dict(tiles=(4, 4))),
                                        ("group", dict(tile_size=(32, 12)))])
def test_norm_nets_equal_the_untiled_model_with_synchronized_statistics(norm, grid):
    torch.manual_seed(0)
    model = GroupNormNet(norm).eval()
    x = torch.randn(2, 3, 32, 32) * 3 + 1  # a batch, a non-zero mean: statistics per sample and group
    tiled = compile_tiled(model, (x,), whole_below_bytes=0, **grid)
    _close(tiled(x), _untiled(model, x))
    report = tiled.report()
    assert any(ph["sync"] for ph in report.phases)  # statistics really were synchronized


def test_layer_norm_over_the_image_is_synchronized():
    class LN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.ln = nn.LayerNorm([4, 16, 16])
            self.ln2 = nn.LayerNorm([16, 16])
            nn.init.normal_(self.ln.weight, 1, 0.3), nn.init.normal_(self.ln.bias, 0, 0.3)

        def forward(self, x):
            return self.ln2(self.conv2(self.ln(self.conv(x))))

    torch.manual_seed(0)
    model = LN().eval()
    x = torch.randn(1, 3, 16, 16)
    _close(compile_tiled(model, (x,), tiles=(2, 2), whole_below_bytes=0)(x), _untiled(model, x))


@pytest.mark.parametrize("op", ["conv_transpose", "conv_transpose_outpad", "flip", "roll",
                                "nearest_1_5", "spatial_slice", "maxpool_ceil", "conv_same_even"])
def test_more_local_ops_equal_the_untiled_model(op):
    torch.manual_seed(0)
    convt = nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1)
    convt_op = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    same = nn.Conv2d(4, 4, 4, padding="same")

    def body(x):
        x = conv(x)
        if op == "conv_transpose":
            x = convt(x)
        elif op == "conv_transpose_outpad":
            x = convt_op(x)
        elif op == "flip":
            x = torch.flip(x, dims=(2, 3))
        elif op == "roll":
            x = torch.roll(x, shifts=(3, -2), dims=(2, 3))
        elif op == "circular_pad":
            x = F.pad(x, (2, 1, 1, 2), mode="circular")
        elif op == "nearest_1_5":
            x = F.interpolate(x, scale_factor=1.5, mode="nearest")
        elif op == "spatial_slice":
            x = x[:, :, 1:-1, 2:]
        elif op == "maxpool_ceil":
            x = F.max_pool2d(x, 3, 2, 1, ceil_mode=True)
        elif op == "conv_same_even":
            x = same(x)
        return conv(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mods = nn.ModuleList([convt, convt_op, conv, same])

        def forward(self, x):
            return body(x)

    model = Net().eval()
    x = torch.randn(1, 4, 18, 18)
    # wrapping ops make a border tile read both ends of the image: only coarse grids stay within the halo rule
    grids = {"roll": [(2, 1), (1, 2)], "maxpool_ceil": [(2, 2), (2, 3)]}.get(op, [(2, 2), (3, 4)])
    for tiles in grids:
        tiled = compile_tiled(model, (x,), tiles=tiles, whole_below_bytes=0)
        _close(tiled(x), _untiled(model, x))


def test_regions_stay_within_tile_plus_halo():
    """No full-size intermediate on the tiled path: every region a tile computes is its own
    pixels plus the halo, which is far smaller than the image."""
    torch.manual_seed(0)
    model = GroupNormNet().eval()
    x = torch.randn(1, 3, 64, 64)
    tiled = compile_tiled(model, (x,), tiles=(4, 4), whole_below_bytes=0)
    for progs in tiled.plan.programs.values():
        for prog in progs:
            for step in prog.steps:
                if step.action != "compute":
                    continue
                res = step.node.meta[K.SPATIAL].resolution
                for (lo, hi), (olo, ohi), size in zip(step.region, step.owned, res):
                    assert olo - lo <= 3 and hi - ohi <= 3  # the largest halo of this net
                    assert hi - lo < size


# ---------------------------------------------------------------------------------------------
# models, unchanged


class _Decode(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z).sample


@pytest.fixture(scope="module")
def small_vae():
    from sigec.models import autoencoder_kl

    return autoencoder_kl()


@pytest.mark.parametrize("whole_below", [0, None])
def test_small_vae_decoder_equals_untiled(small_vae, whole_below):
    dec = _Decode(small_vae).eval()
    z = torch.randn(1, 4, 16, 16)
    tiled = compile_tiled(dec, (z,), tiles=(2, 2), whole_below_bytes=whole_below)
    _close(tiled(z), _untiled(dec, z))
    report = str(tiled.report())
    assert "sync" in report and "estimated peak memory" in report
    # attention runs whole at its own (latent) resolution
    attention = [n for n in tiled.graph_module.graph.nodes
                 if n.target == torch.ops.aten.scaled_dot_product_attention.default]
    assert attention and all(n.meta[K.SCHEDULE].mode == "whole" for n in attention)


def test_small_vae_encoder_equals_untiled(small_vae):
    x = torch.randn(1, 3, 64, 64)
    tiled = compile_tiled(small_vae.encoder, (x,), tiles=(2, 2), whole_below_bytes=0)
    _close(tiled(x), _untiled(small_vae.encoder, x))


def test_church_structured_unet_at_twice_its_size():
    from sigec.models import ddpm_unet

    unet = ddpm_unet("church-small")  # built for 64x64
    x, t = torch.randn(1, 3, 96, 96), torch.tensor([400])
    tiled = compile_tiled(unet, (x, t), tiles=(2, 2))
    _close(tiled(x, t).sample, _untiled(unet, x, t).sample, tol=1e-4)


def test_spade_generator_needs_no_synchronization():
    from sigec.models import label_map, spade_generator

    gen = spade_generator(base=16, levels=3)  # 64x64 output
    seg = label_map(8, 64)
    tiled = compile_tiled(gen, (seg,), tiles=(2, 2))
    _close(tiled(seg), _untiled(gen, seg))
    assert tiled.plan.phases == 1 and not tiled.plan.stats_of  # batch norms use running statistics


def test_sigec_compile_dispatches_to_tiling():
    torch.manual_seed(0)
    model = GroupNormNet().eval()
    x = torch.randn(1, 3, 32, 32)
    tiled = sigec.compile(model, x, tiles=(2, 2))
    assert isinstance(tiled, TiledModule)
    _close(tiled(x), _untiled(model, x))
    _close(sigec.compile(model, x, tile_size=16, cache_dtype=torch.float32)(x), _untiled(model, x))


# ---------------------------------------------------------------------------------------------
# holding versus recomputing, storage dtype, preview statistics


def test_budget_trades_recomputation_for_memory():
    torch.manual_seed(0)
    model = GroupNormNet().eval()
    x = torch.randn(1, 3, 64, 64)
    ref = _untiled(model, x)
    fast = compile_tiled(model, (x,), tiles=(2, 2), whole_below_bytes=0, on_cache_full="raise",
                         cache_budget_bytes=2**30)
    assert all(macs_per_output_pixel(n) == 0 for n in fast.plan.dropped)  # only copies and norms are recomputed
    low = min(entry[2] for entry in fast.plan.path)
    small = compile_tiled(model, (x,), tiles=(2, 2), whole_below_bytes=0,
                          cache_budget_bytes=fast.plan.estimated_peak_bytes - 1)
    assert small.plan.estimated_peak_bytes < fast.plan.estimated_peak_bytes
    assert small.plan.dropped and small.plan.estimated_macs > fast.plan.estimated_macs
    _close(small(x), ref)
    _close(fast(x), ref)
    with pytest.raises(TilingError, match="no plan fits the budget"):
        compile_tiled(model, (x,), tiles=(2, 2), whole_below_bytes=0, cache_budget_bytes=1024)
    with pytest.raises(TilingError, match="over the budget"):
        compile_tiled(model, (x,), tiles=(2, 2), whole_below_bytes=0, cache_budget_bytes=low - 1,
                      on_cache_full="raise")


def test_narrow_storage_dtype_for_held_values():
    torch.manual_seed(0)
    model = GroupNormNet().eval()
    x = torch.randn(1, 3, 32, 32)
    wide = compile_tiled(model, (x,), tiles=(2, 2), whole_below_bytes=0, on_cache_full="raise",
                         cache_budget_bytes=2**30)
    narrow = compile_tiled(model, (x,), tiles=(2, 2), whole_below_bytes=0, on_cache_full="raise",
                           cache_budget_bytes=2**30, cache_dtype=torch.float16)
    assert narrow.plan.held and sum(narrow.plan.held_bytes.values()) * 2 == sum(wide.plan.held_bytes.values())
    ref = _untiled(model, x)
    assert psnr(narrow(x), ref) > 60
    assert "float16" in str(narrow.report())


def test_preview_statistics_are_an_approximation_without_synchronization(small_vae):
    dec = _Decode(small_vae).eval()
    z = torch.randn(1, 4, 32, 32)
    tiled = compile_tiled(dec, (z,), tiles=(2, 2), norm_stats="preview", whole_below_bytes=0)
    assert not tiled.plan.stats_of  # no statistics phase
    exact = compile_tiled(dec, (z,), tiles=(2, 2), whole_below_bytes=0)
    assert tiled.plan.phases < exact.plan.phases
    ref = _untiled(dec, z)
    assert 20 < psnr(tiled(z), ref) < float("inf")
    assert "approximation" in str(tiled.report())


# ---------------------------------------------------------------------------------------------
# bad input


def _net():
    torch.manual_seed(0)
    return GroupNormNet().eval(), torch.randn(1, 3, 32, 32)


def test_grid_that_does_not_fit_the_output():
    model, x = _net()
    with pytest.raises(TilingError, match="does not fit the 32x32 output"):
        compile_tiled(model, (x,), tiles=(33, 2))
    with pytest.raises(TilingError, match="at least 1"):
        compile_tiled(model, (x,), tiles=(0, 2))
    with pytest.raises(TilingError, match="at least 1"):
        compile_tiled(model, (x,), tile_size=0)
    with pytest.raises(TilingError, match="not both"):
        compile_tiled(model, (x,), tiles=(2, 2), tile_size=8)
    with pytest.raises(TilingError, match="pair of ints"):
        compile_tiled(model, (x,), tiles=(2.5, 2))


def test_tile_smaller_than_its_halo():
    deep = nn.Sequential(*[nn.Conv2d(2, 2, 5, padding=2) for _ in range(4)]).eval()  # halo of 8 px
    x = torch.randn(1, 2, 32, 32)
    with pytest.raises(TilingError, match=r"a tile is 4 px high at 32x32 .*smaller than the halo of \d+ px"):
        compile_tiled(deep, (x,), tiles=(8, 8))
    _close(compile_tiled(deep, (x,), tiles=(4, 4))(x), _untiled(deep, x))  # 8-px tiles fit


def test_untileable_ops_are_named():
    class Twisted(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            y = F.interpolate(self.conv(x), scale_factor=2.0, mode="bilinear", align_corners=True)
            return self.conv(y).transpose(2, 3)  # mixes rows and columns

    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(TilingError, match=r"2 op\(s\) cannot be tiled: upsample_bilinear2d .*align_corners.*; transpose \(aten.transpose.int\)"):
        compile_tiled(Twisted().eval(), (x,), tiles=(2, 2))


def test_other_bad_input():
    model, x = _net()
    with pytest.raises(TilingError, match="no meaning with tiles"):
        sigec.compile(model, x, tiles=(2, 2), policy="exact")
    with pytest.raises(TilingError, match="norm_stats"):
        compile_tiled(model, (x,), tiles=(2, 2), norm_stats="approximate")
    with pytest.raises(TilingError, match="training mode"):
        compile_tiled(GroupNormNet().train(), (x,), tiles=(2, 2))

    class Pooled(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    with pytest.raises(TilingError, match="no image output"):
        compile_tiled(Pooled().eval(), (x,), tiles=(2, 2))
    tiled = compile_tiled(model, (x,), tiles=(2, 2))
    with pytest.raises(TilingError, match="compiled for"):
        tiled(torch.randn(1, 3, 16, 16))
    with pytest.raises(TilingError, match="compile again"):
        tiled.to(torch.float64)


def test_report_is_json_ready():
    model, x = _net()
    report = compile_tiled(model, (x,), tiles=(2, 2), whole_below_bytes=0).report()
    d = json.loads(json.dumps(report.as_dict()))
    assert d["grid"]["rows"] == [0, 16, 32] and d["estimated_peak_bytes"] > 0
    assert d["halos"]["32x32"] == [2, 2] or d["halos"]["32x32"][0] >= 1


# ---------------------------------------------------------------------------------------------
# the benchmark


def test_benchmark_quick_mode(tmp_path):
    from benchmarks import tiled_memory

    out = tmp_path / "tiled_memory.json"
    result = tiled_memory.main(["--quick", "--json", str(out)])
    rows = {r["name"]: r for r in result["cases"]["vae-quick"]["rows"]}
    assert list(rows) == ["untiled", "sigec 2x2 exact (held float16)", "diffusers tiled 16-px (2x2)", "sigec 2x2 preview"]
    assert rows["untiled"]["psnr_db"] == float("inf")
    assert rows["sigec 2x2 exact (held float16)"]["psnr_db"] > 60
    assert rows["sigec 2x2 exact (held float16)"]["psnr_db"] > rows["diffusers tiled 16-px (2x2)"]["psnr_db"]
    assert all(r["peak_growth_bytes"][0] is None or r["peak_growth_bytes"][0] >= 0 for r in rows.values())
    assert all(r["profiler_peak_bytes"] > 0 for r in rows.values())
    assert rows["sigec 2x2 exact (held float16)"]["estimated_peak_bytes"] > 0
    saved = json.loads(out.read_text())["cases"]["vae-quick"]["rows"]
    assert [r["name"] for r in saved] == list(rows)


def test_sigec_dump_tiles(capsys):
    from sigec.frontends.cli import main

    assert main(["dump", "tests.cli_targets:church_small", "--tiles", "2x2"]) == 0
    text = capsys.readouterr().out
    assert "tiled plan: 2x2 tiles over the 64x64 output" in text and "sync group_norm" in text
    assert "estimated peak memory" in text and "halos" in text
    assert main(["dump", "tests.cli_targets:church_small", "--tiles", "2", "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["plan"]["grid"]["rows"] == [0, 32, 64]
    assert any(row["mode"] == "tiled" and row["halo"] for row in d["nodes"])
    assert main(["dump", "tests.cli_targets:church_small", "--tiles", "2by2"]) == 1
    assert "--tiles takes N or ROWSxCOLS" in capsys.readouterr().err
