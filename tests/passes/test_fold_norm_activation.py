import torch
import torch.nn as nn

from sigec.ir import meta_keys as K
from tests.passes.helpers import analyse, node


class Block(nn.Module):
    def __init__(self, hand_silu=False):
        super().__init__()
        self.conv0 = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.hand_silu = hand_silu

    def forward(self, x):
        h = self.norm(self.conv0(x))
        a = h * torch.sigmoid(h) if self.hand_silu else nn.functional.silu(h)
        return self.conv1(a) + self.conv2(torch.relu(a))


def test_norm_and_activation_fold_into_gather():
    gm, _ = analyse(Block(), (torch.randn(1, 4, 32, 32),))
    pro = node(gm, "conv2d_1").meta[K.PROLOGUE]
    assert pro.norm is node(gm, "group_norm") and pro.activation == "silu" and pro.source is node(gm, "conv2d")
    pro2 = node(gm, "conv2d_2").meta[K.PROLOGUE]
    assert pro2.norm is None and pro2.activation == "relu" and pro2.source is node(gm, "silu")
    assert node(gm, "conv2d").meta[K.PROLOGUE] is None  # reads the input directly


def test_hand_written_silu_is_recognised():
    gm, _ = analyse(Block(hand_silu=True), (torch.randn(1, 4, 32, 32),))
    assert node(gm, "conv2d_1").meta[K.PROLOGUE].activation == "silu"


def test_no_fold_when_local_op_is_dense():
    gm, _ = analyse(Block(), (torch.randn(1, 4, 32, 32),), expected_active_fraction=1.0)
    assert all(n.meta.get(K.PROLOGUE) is None for n in gm.graph.nodes)
