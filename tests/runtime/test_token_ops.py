"""Token ops for sparse attention (runtime/token_ops.py): agreement with plain loops, opcheck, errors."""
import pytest
import torch

from sigec.runtime import token_ops

sigec = torch.ops.sigec


def _tokens(n=2, length=12, c=5, dtype=torch.float32):
    return torch.randn(n, length, c).to(dtype)


INDICES = torch.tensor([7, 0, 11, 3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_token_gather_takes_the_rows_of_every_sample(dtype):
    x = _tokens(dtype=dtype)
    got = sigec.token_gather(x, INDICES)
    expect = torch.stack([torch.stack([x[s, i] for i in INDICES.tolist()]) for s in range(x.shape[0])])
    assert got.is_contiguous() and got.dtype == dtype
    assert torch.equal(got, expect)


def test_token_gather_of_a_strided_view():
    # tokens of an NCHW image are a permuted view: (N, C, H, W) -> (N, H*W, C)
    image = torch.randn(2, 5, 3, 4)
    tokens = image.flatten(2).transpose(1, 2)
    got = sigec.token_gather(tokens, INDICES)
    rows, cols = INDICES // 4, INDICES % 4
    assert torch.equal(got, image[:, :, rows, cols].transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_scatter_writes_in_place_and_only_the_given_rows(dtype):
    base = _tokens(dtype=dtype)
    before, ptr = base.clone(), base.data_ptr()
    new = torch.randn(2, len(INDICES), 5)  # float32 into the base's dtype
    sigec.token_scatter_(base, new, INDICES)
    assert base.data_ptr() == ptr
    for s in range(2):
        for t in range(12):
            expect = new[s, INDICES.tolist().index(t)].to(dtype) if t in INDICES.tolist() else before[s, t]
            assert torch.equal(base[s, t], expect)


def test_token_scatter_into_a_strided_view_writes_the_image():
    image = torch.randn(1, 5, 3, 4)
    tokens = image.flatten(2).transpose(1, 2)  # a view: writes reach the image
    new = torch.randn(1, len(INDICES), 5)
    sigec.token_scatter_(tokens, new, INDICES)
    assert torch.equal(image[0, :, 1, 3], new[0, 0])  # token 7 is row 1, column 3


def test_gather_then_scatter_round_trips():
    x = _tokens()
    y = torch.zeros_like(x)
    sigec.token_scatter_(y, sigec.token_gather(x, INDICES), INDICES)
    keep = torch.zeros(12, dtype=torch.bool)
    keep[INDICES] = True
    assert torch.equal(y[:, keep], x[:, keep]) and not y[:, ~keep].any()


def test_token_indices_are_row_major_positions_of_the_mask():
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = mask[1, 0] = True
    assert token_ops.token_indices(mask).tolist() == [1, 4, 11]
    with pytest.raises(ValueError, match="boolean mask"):
        token_ops.token_indices(mask.float())


def test_bad_arguments_name_what_is_wrong():
    x = _tokens()
    with pytest.raises(ValueError, match="3-D"):
        sigec.token_gather(x[0], INDICES)
    with pytest.raises(ValueError, match="int64"):
        sigec.token_gather(x, INDICES.int())
    with pytest.raises(ValueError, match=r"tokens must be \(N, nt, C\)"):
        sigec.token_scatter_(x, torch.randn(2, 3, 5), INDICES)
    with pytest.raises((IndexError, RuntimeError), match="out of"):
        sigec.token_gather(x, torch.tensor([12]))


def _opcheck_samples():
    x = _tokens()
    strided = torch.randn(2, 5, 3, 4).flatten(2).transpose(1, 2)
    return [
        (sigec.token_gather.default, (x, INDICES)),
        (sigec.token_gather.default, (strided, INDICES)),
        (sigec.token_gather.default, (x, torch.zeros(0, dtype=torch.int64))),
        (sigec.token_scatter_.default, (x.clone(), torch.randn(2, 4, 5), INDICES)),
        (sigec.token_scatter_.default, (x.clone(), torch.randn(2, 4, 5, dtype=torch.float64), INDICES)),
    ]


@pytest.mark.parametrize("i", range(len(_opcheck_samples())))
def test_opcheck(i):
    op, args = _opcheck_samples()[i]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_every_token_op_is_opchecked():
    assert {op for op, _ in _opcheck_samples()} == set(token_ops.ALL_OPS.values())
