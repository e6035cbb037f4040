"""Each table rule, run sparsely on a whole-image edit under ``exact``, equals the dense op."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sigec
from sigec.ir import meta_keys as K
from sigec.passes import op_table
from sigec.passes.op_table import OpKind, lookup
from sigec.ir.plan import DecisionKind

aten = torch.ops.aten


class One(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


CASES = {
    "conv_k5_s2_d2_g2": lambda: nn.Conv2d(4, 6, 5, stride=2, padding=3, dilation=2, groups=2),
    "conv_same": lambda: nn.Conv2d(4, 4, 4, padding="same"),
    "conv_valid": lambda: nn.Conv2d(4, 4, 3),
    "max_pool": lambda: One(lambda x: F.max_pool2d(x, 3, 2, 1)),
    "max_pool_dilated": lambda: One(lambda x: F.max_pool2d(x, 2, 1, 0, 2)),
    "avg_pool": lambda: One(lambda x: F.avg_pool2d(x, 3, 2, 1)),
    "nearest_up": lambda: One(lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest")),
    "nearest_down": lambda: One(lambda x: F.interpolate(x, scale_factor=0.5, mode="nearest")),
    "bilinear_up": lambda: One(lambda x: F.interpolate(x, scale_factor=2.0, mode="bilinear")),
    "bilinear_down": lambda: One(lambda x: F.interpolate(x, scale_factor=0.5, mode="bilinear")),
    "pad_constant": lambda: One(lambda x: F.pad(x, (1, 2, 2, 1), value=0.5)),
    "pad_reflect": lambda: One(lambda x: F.pad(x, (2, 2, 2, 2), mode="reflect")),
    "pad_replicate": lambda: One(lambda x: F.pad(x, (1, 1, 1, 1), mode="replicate")),
    "conv_reflect": lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
    "batch_norm_eval": lambda: nn.BatchNorm2d(4),
    "channel_slice_cat": lambda: One(lambda x: torch.cat([x[:, :2] * 2, torch.relu(x[:, 2:])], 1)),
    "channel_mean": lambda: One(lambda x: x - x.mean(dim=1, keepdim=True)),
    "chunk": lambda: One(lambda x: x.chunk(2, dim=1)[0] * x.chunk(2, dim=1)[1]),
    "channels_last_layer_norm_linear": lambda: ChannelsLast(),
}


class ChannelsLast(nn.Module):
    """ConvNeXt-style: per-pixel LayerNorm and Linear on a channels-last view."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(4), nn.Linear(4, 4)

    def forward(self, x):
        return x + self.fc(F.gelu(self.norm(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)


@pytest.mark.parametrize("block", [3, 4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_rule_equals_dense(case, block):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), CASES[case]()).eval()
    x = torch.randn(1, 4, 16, 16)
    engine = sigec.compile(model, (x,), policy="exact", block_size=block, expected_active_fraction=0.01)
    decided = {n.name: n.meta[K.DECISION].kind for n in engine.graph_module.graph.nodes if n.op == "call_function"}
    engine(x)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[5:9, 2:7] = True
    x2 = torch.where(mask, x + 1, x)
    torch.testing.assert_close(engine(x2), model(x2), rtol=1e-5, atol=1e-5)
    full = torch.ones(16, 16, dtype=torch.bool)
    torch.testing.assert_close(engine(x2 * 2, mask=full), model(x2 * 2), rtol=1e-5, atol=1e-5)
    assert DecisionKind.SPARSE in decided.values()


def test_pointwise_ops_come_from_the_schema_tag():
    for target in (aten.silu.default, aten.add.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.sub.Tensor,
                   aten.gelu.default, aten.tanh.default, aten.sigmoid.default, aten.leaky_relu.default,
                   aten.relu.default, aten.where.self):
        assert lookup(target).kind is OpKind.POINTWISE, target
    assert lookup(aten.silu.default).activation is not None
    assert lookup(aten.scaled_dot_product_attention.default) is None  # fallback until sparse attention


def test_table_is_consistent():
    for target in op_table.known_targets():
        rule = lookup(target)
        assert (rule.kind is OpKind.LOCAL) == (rule.local is not None), target


def test_layer_norm_over_an_nchw_width_is_a_fallback():
    model = One(lambda x: F.layer_norm(x, (x.shape[-1],)))
    engine = sigec.compile(nn.Sequential(nn.Conv2d(2, 2, 1), model).eval(), (torch.randn(1, 2, 8, 8),))
    assert "mixes pixels" in engine.report().fallbacks()["layer_norm"]


def test_unsupported_variants_fall_back_with_reasons():
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ConvTranspose2d(2, 2, 2, stride=2), nn.Dropout(0.5),
                          One(lambda x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))).eval()
    engine = sigec.compile(model, (torch.randn(1, 2, 8, 8),))
    reasons = engine.report().fallbacks()
    assert any("count_include_pad" in r for r in reasons.values())
    assert any("conv_transpose" in r or "transposed" in r for r in reasons.values())
