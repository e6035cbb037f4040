"""Attention ops (runtime/attention.py): the native token attention against float64, opcheck, errors."""
import os

import pytest
import torch

from sigec.runtime import attention, native

sigec = torch.ops.sigec


def _tokens(n, length, keys, heads, d, dv, dtype=torch.float32):
    g = torch.Generator().manual_seed(length * 1000 + keys)
    q = torch.randn(n, length, heads * d, generator=g).to(dtype)
    k = torch.randn(n, keys, heads * d, generator=g).to(dtype)
    v = torch.randn(n, keys, heads * dv, generator=g).to(dtype)
    return q, k, v


@pytest.mark.skipif(os.environ.get("SIGEC_NATIVE") == "0", reason="native kernels disabled")
@pytest.mark.parametrize("n,length,keys,heads,d,dv", [
    (1, 1, 1, 1, 1, 8),      # one query, one key
    (1, 16, 9, 2, 3, 8),     # one vector of queries; a partial tile of keys
    (2, 17, 77, 8, 40, 40),  # two vectors with one query in the second; text keys; SD's heads
    (1, 33, 256, 64, 8, 8),  # a DDPM UNet's 64 heads of 8 channels
    (1, 40, 300, 3, 5, 12),  # values past a whole tile (the last tile overlaps)
])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_attend_matches_float64(n, length, keys, heads, d, dv, scale):
    assert native.load(), native.status()
    q, k, v = _tokens(n, length, keys, heads, d, dv)
    got = sigec.attend(q, k, v, heads, scale)
    assert got.shape == (n, length, heads * dv) and got.is_contiguous()
    expected = attention.attend_reference(q.double(), k.double(), v.double(), heads, scale)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,dv", [(torch.bfloat16, 8), (torch.float32, 4)])
def test_attend_outside_the_native_kernel_is_the_reference(dtype, dv):
    q, k, v = _tokens(1, 20, 30, 2, 8, dv, dtype)
    got = sigec.attend(q, k, v, 2, None)
    torch.testing.assert_close(got, attention.attend_reference(q, k, v, 2, None))


def test_large_scores_stay_finite():
    # the softmax subtracts each query's largest score before the exponential
    q, k, v = _tokens(1, 20, 50, 1, 8, 8)
    got = sigec.attend(q * 40, k * 40, v, 1, None)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), attention.attend_reference((q * 40).double(), (k * 40).double(),
                                                                        v.double(), 1, None), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(os.environ.get("SIGEC_NATIVE") == "0" or torch.backends.cpu.get_cpu_capability() != "AVX512",
                    reason="the native attention needs AVX-512")
def test_native_attention_replaces_the_library_kernel_and_the_reference_context_restores_it():
    assert native.load(), native.status()
    q, k, v = _tokens(1, 20, 30, 2, 8, 8)
    for reference in (False, True):
        with torch.profiler.profile() as prof:
            if reference:
                with native.reference_kernels():
                    sigec.attend(q, k, v, 2, None)
            else:
                sigec.attend(q, k, v, 2, None)
        assert any("scaled_dot_product" in e.name for e in prof.events()) == reference


def test_mismatched_heads_are_refused():
    q, k, v = _tokens(1, 4, 5, 2, 8, 8)
    with pytest.raises(ValueError, match="divisible by heads=3"):
        sigec.attention(q, k, v, 3, None)


def _opcheck_samples():
    q, k, v = _tokens(1, 20, 30, 2, 8, 8)
    return [
        (sigec.attend.default, (q, k, v, 2, None)),
        (sigec.attend.default, (q, k, v, 2, 0.5)),
        (sigec.attention.default, (q.view(1, 4, 5, 16), k.view(1, 5, 6, 16), v.view(1, 5, 6, 16), 2, None)),
        (sigec.attention_blocks.default, (q.view(5, 2, 2, 16), k.view(1, 5, 6, 16), v.view(1, 5, 6, 16), 2, None)),
    ]


@pytest.mark.parametrize("i", range(len(_opcheck_samples())))
def test_opcheck(i):
    op, args = _opcheck_samples()[i]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_every_attention_op_is_opchecked():
    assert {op for op, _ in _opcheck_samples()} == set(attention.ALL_OPS.values())
