import torch
import torch.nn.functional as F

from sigec.runtime import masks as M


def test_active_blocks_and_back_to_pixels():
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[0, 0] = True
    mask[9, 5] = True  # bottom edge: a partial block row
    idx = M.active_blocks(mask, (4, 4))
    assert idx.tolist() == [[0, 0], [2, 1]]
    pixels = M.blocks_to_pixels(idx, (4, 4), (10, 10))
    assert pixels.shape == (10, 10) and pixels.sum() == 16 + 2 * 4
    assert (pixels | ~mask).all()  # blocks cover every active pixel


def test_sige_resampling_is_conservative_and_dilated():
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[10:12, 20:22] = True
    expr = M.Resampled(M.InputMask((32, 32)), (8, 8), 0.0, 1)
    small = M.evaluate_masks([expr], mask)[expr]
    assert small.shape == (8, 8)
    assert small[2:3, 5:6].all()  # the edited 4x4 cell
    assert small.sum() == 9  # dilated by one cell in every direction
    expr0 = M.Resampled(M.InputMask((32, 32)), (8, 8), 0.0, 0)
    assert M.evaluate_masks([expr0], mask)[expr0].sum() == 1


def test_window_growth_matches_convolution_support():
    torch.manual_seed(0)
    for k, s, p, d in [(3, 1, 1, 1), (5, 2, 2, 1), (3, 2, 0, 2), (4, 1, 2, 1)]:
        mask = torch.rand(17, 17) > 0.95
        out_size = (17 + 2 * p - d * (k - 1) - 1) // s + 1
        expr = M.Window(M.InputMask((17, 17)), (k, k), (s, s), (p, p), (d, d), (out_size, out_size))
        grown = M.evaluate_masks([expr], mask)[expr]
        # a conv with positive weights is non-zero exactly where the grown mask is
        support = F.conv2d(mask.float()[None, None], torch.ones(1, 1, k, k), stride=s, padding=p, dilation=d)[0, 0] > 0
        assert torch.equal(grown, support), (k, s, p, d)


def test_interned_expressions_are_shared():
    a = M.Window(M.InputMask((8, 8)), (3, 3), (1, 1), (1, 1), (1, 1), (8, 8))
    b = M.Window(M.InputMask((8, 8)), (3, 3), (1, 1), (1, 1), (1, 1), (8, 8))
    assert a is b and {a: 1}[b] == 1
    assert M.union([a, M.InputMask((8, 8))]) is a
