import torch
import torch.nn as nn

from sigec import meta_keys as K
from sigec.passes.partition import representative_mask
from sigec.plan import DecisionKind
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
