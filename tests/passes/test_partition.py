import pytest
import torch
import torch.nn as nn

from sigec.ir import meta_keys as K
from sigec.ir.costs import KernelCosts
from sigec.passes.partition import estimated_seconds, representative_mask
from sigec.ir.plan import Decision, DecisionKind
from tests.passes.helpers import analyse, node


class Pyramid(nn.Module):
    def __init__(self):
        super().__init__()
        self.big = nn.Conv2d(8, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=8, padding=1)
        self.small = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x, t):
        h = torch.relu(self.big(x))
        s = self.small(self.down(h))  # 4x4: every block touched by any edit
        return h * t.float().mean(), s


def test_decisions_follow_cost_and_operands():
    gm, _ = analyse(Pyramid(), (torch.randn(1, 8, 32, 32), torch.tensor([2])), until="partition")
    d = {n.name: n.meta[K.DECISION].kind for n in gm.graph.nodes}
    assert d["conv2d"] is DecisionKind.SPARSE
    assert d["relu"] is DecisionKind.SPARSE  # its operand is already in blocks
    assert d["conv2d_2"] is DecisionKind.DENSE  # a 4x4 map: sparse cannot pay
    assert "sparse" in node(gm, "conv2d_2").meta[K.DECISION].reason
    assert d["mean"] is DecisionKind.STATIC and d["t"] is DecisionKind.STATIC


def test_whole_image_edit_plan_makes_everything_dense():
    gm, _ = analyse(Pyramid(), (torch.randn(1, 8, 32, 32), torch.tensor([2])), until="partition",
                    expected_active_fraction=1.0)
    assert node(gm, "conv2d").meta[K.DECISION].kind is DecisionKind.DENSE


def test_representative_mask_area():
    m = representative_mask((40, 40), 0.25)
    assert m.sum() == 400


#: what sigec.ir.costs.measure gave on the development machine (2 cores, native kernels, fp32)
MEASURED = KernelCosts(dense_mac=5.0e-12, dense_weight_byte=7.5e-11, sparse_mac=6.8e-12, sparse_weight_byte=6.0e-11,
                       element=5.5e-10, call=2.0e-5, source="development machine")


class Wide(nn.Module):
    """A narrow layer at 64x64 and a wide one at 8x8 (1-pixel blocks there)."""

    def __init__(self, wide: int):
        super().__init__()
        self.narrow = nn.Conv2d(4, 4, 3, padding=1)
        self.down = nn.Conv2d(4, wide, 8, stride=8)
        self.wide = nn.Conv2d(wide, wide, 3, padding=1)

    def forward(self, x):
        return self.wide(self.down(self.narrow(x)))


def _decisions(model, fraction, costs):
    gm, _ = analyse(model, (torch.randn(1, 4, 64, 64),), until="partition", expected_active_fraction=fraction,
                    kernel_costs=costs)
    return {n.name: n.meta[K.DECISION] for n in gm.graph.nodes}


def test_measured_costs_send_a_wide_low_resolution_layer_sparse_and_a_cheap_one_dense():
    # 256 channels at 8x8: a 1% edit touches 16 of 64 pixels, and the saved MACs outweigh three calls
    wide = _decisions(Wide(256), 0.01, MEASURED)
    assert wide["conv2d_2"].kind is DecisionKind.SPARSE
    # 4 channels at 64x64: the whole layer costs less than the gather and scatter calls
    assert wide["conv2d"].kind is DecisionKind.DENSE
    # the same wide layer at a 60% edit: most of the map is computed anyway
    assert _decisions(Wide(256), 0.6, MEASURED)["conv2d_2"].kind is DecisionKind.DENSE
    # with 8 channels the 8x8 layer is too small for any edit to pay for three calls
    assert _decisions(Wide(8), 0.01, MEASURED)["conv2d_2"].kind is DecisionKind.DENSE


def test_the_decision_follows_the_estimate_it_reports():
    gm, _ = analyse(Wide(256), (torch.randn(1, 4, 64, 64),), until="partition", expected_active_fraction=0.01,
                    kernel_costs=MEASURED)
    conv = node(gm, "conv2d_2")
    # the planned 1% square (6x6 pixels) covers 1 or 2 pixels a side at 8x8; sige dilates by 1: 4x4
    assert "est. 25% of blocks touched" in conv.meta[K.DECISION].reason
    sparse, dense = estimated_seconds(conv, 16 / 64, MEASURED)
    assert sparse < dense
    assert f"sparse {sparse * 1e3:.3g} ms vs dense {dense * 1e3:.3g} ms" in conv.meta[K.DECISION].reason
    # the dense estimate: one call, the weights once, every MAC
    weights = 256 * 256 * 9 * 4 + 256 * 4
    macs = 256 * 256 * 9 * 64
    assert dense == pytest.approx(MEASURED.call + weights * MEASURED.dense_weight_byte + macs * MEASURED.dense_mac
                                  + 256 * 64 * MEASURED.element)
    # a dense op whose input is produced sparse also pays to scatter that input's blocks
    assert node(gm, "conv2d_1").meta[K.DECISION].kind is DecisionKind.DENSE
    node(gm, "conv2d_1").meta[K.DECISION] = Decision(DecisionKind.SPARSE, "as if")
    assert estimated_seconds(conv, 16 / 64, MEASURED)[1] == pytest.approx(dense + 16 / 64 * 256 * 64 * MEASURED.element)
    # calls cost more than the layer: dense
    slow_calls = KernelCosts(**{**vars(MEASURED), "call": 1.0})
    assert estimated_seconds(conv, 16 / 64, slow_calls)[0] > estimated_seconds(conv, 16 / 64, slow_calls)[1]
