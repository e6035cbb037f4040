import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

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


# -- evaluation on booleans equals the float max-pooling it replaces --------------------------------


def _window_by_max_pool(mask: torch.Tensor, expr: M.Window) -> torch.Tensor:
    """The former evaluation of a ``Window``: float max-pooling of the explicitly padded map."""
    (ph, pw), (kh, kw), (dh, dw) = expr.padding, expr.kernel, expr.dilation
    src = F.pad(mask.float()[None, None], (pw, pw + dw * kw, ph, ph + dh * kh))
    out = F.max_pool2d(src, expr.kernel, expr.stride, 0, expr.dilation)[0, 0] > 0
    return M._fit(out, expr.res)


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 20), w=st.integers(1, 20), kh=st.integers(1, 5), kw=st.integers(1, 5),
       sh=st.integers(1, 3), sw=st.integers(1, 3), ph=st.integers(0, 3), pw=st.integers(0, 3),
       dh=st.integers(1, 2), dw=st.integers(1, 2), same=st.booleans(), density=st.floats(0.0, 0.5),
       seed=st.integers(0, 2**16))
def test_window_on_booleans_equals_max_pooling(h, w, kh, kw, sh, sw, ph, pw, dh, dw, same, density, seed):
    mask = torch.rand(h, w, generator=torch.Generator().manual_seed(seed)) < density
    if same:  # "same" geometry: the output keeps the input's resolution (asymmetric padding)
        res = (h, w)
    else:
        res = ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)
        assume(res[0] > 0 and res[1] > 0)
    expr = M.Window(M.InputMask((h, w)), (kh, kw), (sh, sw), (ph, pw), (dh, dw), res)
    got = M.evaluate_masks([expr], mask)[expr]
    assert got.dtype == torch.bool and tuple(got.shape) == res
    assert torch.equal(got, _window_by_max_pool(mask, expr))


@pytest.mark.parametrize("dilation", [0, 1, 2])
@pytest.mark.parametrize("res", [(8, 8), (16, 16), (5, 7), (64, 64)])
def test_resampled_dilation_on_booleans_equals_max_pooling(res, dilation):
    mask = torch.rand(32, 32, generator=torch.Generator().manual_seed(3)) > 0.97
    expr = M.Resampled(M.InputMask((32, 32)), res, 0.1, dilation)
    src = mask.float()[None, None]
    down = res[0] <= 32 and res[1] <= 32
    src = F.interpolate(src, size=res, mode="area" if down else "bilinear", align_corners=None if down else False)
    want = src > 0.1
    if dilation:
        want = F.max_pool2d(want.float(), 2 * dilation + 1, 1, dilation) > 0
    assert torch.equal(M.evaluate_masks([expr], mask)[expr], want[0, 0])


def test_pointwise_window_is_its_source():
    mask = torch.rand(9, 11, generator=torch.Generator().manual_seed(0)) > 0.8
    expr = M.Window(M.InputMask((9, 11)), (1, 1), (1, 1), (0, 0), (1, 1), (9, 11))
    assert torch.equal(M.evaluate_masks([expr], mask)[expr], mask)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("eps", [0.0, 1e-3, -1.0])
def test_difference_mask_flags_every_pixel_whose_difference_is_not_within_eps(eps, channels_last):
    g = torch.Generator().manual_seed(0)
    old = torch.randn(2, 3, 6, 7, generator=g)
    new = old.clone()
    new[0, 1, 2, 3] += 1.0            # edited
    new[1, 2, 4, 5] += 5e-4           # within 1e-3
    new[0, 0, 1, 1] = float("nan")    # NaN difference: edited
    new[1, 1, 5, 6] = old[1, 1, 5, 6] = float("inf")  # inf - inf is NaN: edited
    new[0, 2, 0, 0] = float("-inf")   # infinite difference: edited
    if channels_last:
        new, old = new.to(memory_format=torch.channels_last), old.to(memory_format=torch.channels_last)
    want = ~((new - old).abs() <= eps).reshape(-1, 6, 7).all(dim=0)  # the per-channel definition
    got = M.difference_mask(new, old, eps, (6, 7))
    assert got.dtype == torch.bool and torch.equal(got, want)
    assert got[2, 3] and got[1, 1] and got[5, 6] and got[0, 0] and got[4, 5] == (eps < 5e-4)
