import torch
import torch.nn as nn
import torch.nn.functional as F

from sigec.ir import meta_keys as K
from sigec.runtime import masks as M
from tests.passes.helpers import analyse, node


class Local(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 2, 3, padding=1)
        self.c2 = nn.Conv2d(2, 2, 3, stride=2, padding=1)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        d = self.c2(h)
        return F.interpolate(d, scale_factor=2.0, mode="nearest") + h


def test_exact_masks_grow_by_receptive_field():
    gm, _ = analyse(Local(), (torch.randn(1, 2, 16, 16),), until="propagate_masks", policy="exact")
    base = M.InputMask((16, 16))
    c1 = node(gm, "conv2d").meta[K.MASK]
    assert c1 == M.Window(base, (3, 3), (1, 1), (1, 1), (1, 1), (16, 16))
    assert node(gm, "relu").meta[K.MASK] is c1  # pointwise keeps the mask (interned)
    assert node(gm, "conv2d_1").meta[K.MASK].res == (8, 8)
    up = node(gm, "upsample_nearest2d").meta[K.MASK]
    assert isinstance(up, M.Upsample) and up.res == (16, 16)
    # union of the up path and the skip: neither contains the other structurally
    assert isinstance(node(gm, "add").meta[K.MASK], M.Union_)

    point = torch.zeros(16, 16, dtype=torch.bool)
    point[8, 8] = True
    masks = M.evaluate_masks([node(gm, "add").meta[K.MASK]], point)
    assert masks[c1].sum() == 9  # a 3x3 neighbourhood
    # every pixel the edit can reach in the dense model is inside the mask
    model = Local().eval()
    x = torch.randn(1, 2, 16, 16)
    x2 = x.clone()
    x2[..., 8, 8] += 5
    changed = (model(x2) - model(x)).abs().amax(dim=(0, 1)) > 0
    assert not (changed & ~masks[node(gm, "add").meta[K.MASK]]).any()


def test_sige_masks_are_one_per_resolution():
    gm, _ = analyse(Local(), (torch.randn(1, 2, 16, 16),), until="propagate_masks", policy="sige", dilation=2)
    m16 = {n.meta[K.MASK] for n in gm.graph.nodes
           if n.meta.get(K.MASK) is not None and n.meta[K.SPATIAL].resolution == (16, 16) and n.op != "placeholder"}
    assert len(m16) == 1
    (expr,) = m16
    assert isinstance(expr, M.Resampled) and expr.dilation == 2


def test_union_drops_contained_masks():
    base = M.InputMask((8, 8))
    grown = M.Window(M.Window(base, (3, 3), (1, 1), (1, 1), (1, 1), (8, 8)), (3, 3), (1, 1), (1, 1), (1, 1), (8, 8))
    assert M.union([base, grown]) is grown
    strided = M.Window(base, (3, 3), (2, 2), (1, 1), (1, 1), (4, 4))
    assert not strided.covers_source()


def test_norms_are_reported_as_approximations_under_exact():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4))
    _, ctx = analyse(model, (torch.randn(1, 2, 8, 8),), until="propagate_masks", policy="exact")
    assert ctx.approximations == {"group_norm": "frozen normalization statistics"}
