"""classify_tiling: each value's tiling kind, and every window and gather geometry against the whole op."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sigec.ir import meta_keys as K
from sigec.core.capture import capture
from sigec.passes import PassContext, run_passes
from sigec.passes.classify_spatial import classify_spatial
from sigec.passes.classify_tiling import classify_tiling
from sigec.passes.tile_geometry import TileKind
from sigec.ir.settings import CompileSettings
from tests.passes.helpers import node, nodes_by_target

aten = torch.ops.aten


def classify(fn, x):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(x.shape[1], x.shape[1], 3, padding=1)
            self.norm = nn.GroupNorm(1, x.shape[1])

        def forward(self, x):
            return fn(self, x)

    gm = capture(M().eval(), (x,)).gm
    return run_passes(gm, PassContext(CompileSettings()), [classify_spatial, classify_tiling])


def test_kinds():
    def body(m, x):
        h = F.silu(m.norm(m.conv(x)))
        tokens = h.flatten(2).transpose(1, 2)  # attention-style tokens: whole
        w = F.softmax(tokens @ tokens.transpose(1, 2), dim=-1) @ tokens
        return w.transpose(1, 2).reshape(h.shape) + F.interpolate(h, scale_factor=0.5).repeat_interleave(2, 2) \
            .repeat_interleave(2, 3)

    gm = classify(body, torch.randn(1, 2, 8, 8))
    kind = lambda name: node(gm, name).meta[K.TILE].kind  # noqa: E731
    assert kind("x") is TileKind.SOURCE and kind("conv2d") is TileKind.WINDOW
    assert kind("group_norm") is TileKind.NORM and kind("silu") is TileKind.POINTWISE
    assert kind("transpose") is TileKind.GLOBAL and kind("reshape") is TileKind.GLOBAL
    assert kind("upsample_nearest2d") is TileKind.GATHER
    assert node(gm, "conv_weight").meta[K.TILE].kind is TileKind.SOURCE


def test_untileable_reasons():
    gm = classify(lambda m, x: F.interpolate(m.conv(x), scale_factor=2.0, mode="bilinear", align_corners=True),
                  torch.randn(1, 2, 8, 8))
    rule = nodes_by_target(gm, aten.upsample_bilinear2d.vec)[0].meta[K.TILE]
    assert rule.kind is TileKind.UNTILEABLE and "align_corners" in rule.reason
    gm = classify(lambda m, x: m.conv(x).transpose(2, 3), torch.randn(1, 2, 8, 8))
    assert "no tiling rule" in nodes_by_target(gm, aten.transpose.int)[0].meta[K.TILE].reason


def test_gather_maps_are_read_from_the_op():
    gm = classify(lambda m, x: F.pad(F.interpolate(m.conv(x), scale_factor=1.5, mode="nearest"), (2, 1, 0, 3),
                                     mode="reflect"), torch.randn(1, 2, 8, 6))
    up = nodes_by_target(gm, aten.upsample_nearest2d.vec)[0].meta[K.TILE].geometry
    assert up.src[0].tolist() == [int(o / 1.5) for o in range(12)]  # nearest: floor(o * in / out)
    assert up.repeats == (0, 0)  # 1.5 is no integer factor: indexed, not repeated
    pad = nodes_by_target(gm, aten.pad.default)[0].meta[K.TILE].geometry
    assert pad.src[1].tolist() == [2, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 7]  # reflect by 2 on the left, 1 on the right
    assert pad.src[0].tolist()[-3:] == [10, 9, 8]
    gm = classify(lambda m, x: F.interpolate(m.conv(x), scale_factor=2, mode="nearest"), torch.randn(1, 2, 8, 6))
    assert nodes_by_target(gm, aten.upsample_nearest2d.vec)[0].meta[K.TILE].geometry.repeats == (2, 2)


_G = torch.Generator().manual_seed(0)
_W = {"conv": torch.randn(2, 2, 3, 2, generator=_G), "bias": torch.tensor([0.5, -0.5]),
      "same": torch.randn(2, 2, 4, 3, generator=_G), "transposed": torch.randn(2, 3, 3, 4, generator=_G), "bias3": torch.tensor([0.5, -0.5, 1.0])}
OPS = {
    "conv": lambda x: F.conv2d(x, _W["conv"], _W["bias"], stride=2, padding=(1, 2), dilation=(1, 2)),
    "conv_same": lambda x: F.conv2d(x, _W["same"], padding="same"),
    "conv_transpose": lambda x: F.conv_transpose2d(x, _W["transposed"], _W["bias3"], stride=2, padding=1,
                                                   output_padding=1),
    "max_pool": lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True),
    "avg_pool": lambda x: F.avg_pool2d(x, 3, 2, 1),
    "bilinear_up": lambda x: F.interpolate(x, scale_factor=2.0, mode="bilinear"),
    "bilinear_down": lambda x: F.interpolate(x, scale_factor=0.5, mode="bilinear"),
    "nearest_down": lambda x: F.interpolate(x, size=(4, 5), mode="nearest"),
    "nearest_up": lambda x: F.interpolate(x, scale_factor=3, mode="nearest"),
    "replicate_pad": lambda x: F.pad(x, (1, 3, 2, 0), mode="replicate"),
    "constant_pad": lambda x: F.pad(x, (1, -1, 2, 0), value=7.0),
    "flip": lambda x: x.flip(3),
}


@pytest.mark.parametrize("op", sorted(OPS))
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_every_geometry_equals_the_whole_op_on_any_region(op, data):
    fn = OPS[op]
    x = torch.randn(1, 2, 10, 12)
    gm = classify(lambda m, x: fn(x), x)
    target = next(n for n in gm.graph.nodes if n.op == "call_function" and n.meta[K.TILE].kind in
                  (TileKind.WINDOW, TileKind.GATHER))
    geometry = target.meta[K.TILE].geometry
    whole = fn(x)
    out = []
    for axis in range(2):
        size = whole.shape[2 + axis]
        a = data.draw(st.integers(0, size - 1))
        out.append((a, data.draw(st.integers(a + 1, size))))
    want = tuple(geometry.needs(axis, *out[axis]) for axis in range(2))
    have = tuple((max(lo, 0), min(hi, n)) for (lo, hi), n in zip(want, x.shape[2:]))
    region = x[..., have[0][0]:have[0][1], have[1][0]:have[1][1]]
    args = [region] + [a for a in target.args[1:]]
    args = [_attr(gm, a.target) if hasattr(a, "op") and a.op == "get_attr" else a for a in args]
    got = geometry.run(region, have, want, tuple(out), args, dict(target.kwargs))
    expected = whole[..., out[0][0]:out[0][1], out[1][0]:out[1][1]]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _attr(gm, target: str):
    for part in target.split("."):
        gm = getattr(gm, part)
    return gm
