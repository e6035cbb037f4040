"""Native CPU kernels (csrc/cpu_kernels.cpp) against the pure-PyTorch reference kernels."""
import itertools
import os
import warnings

import pytest
import torch

from sigec.runtime import native
from sigec.runtime.ops import ACTIVATIONS, REFERENCE_KERNELS

sigec = torch.ops.sigec

pytestmark = pytest.mark.skipif(os.environ.get("SIGEC_NATIVE") == "0", reason="native kernels disabled")

DTYPES = {torch.float32: 0.0, torch.float16: 1e-3, torch.bfloat16: 1e-2}
LAYOUTS = (torch.contiguous_format, torch.channels_last)


def test_native_kernels_are_built_and_registered():
    assert native.load(), native.status()
    assert native.available() and "native" in native.status()


def _full(batch, dtype, layout, shape=(5, 13, 11)):
    return torch.randn(batch, *shape).to(dtype).to(memory_format=layout)


def _assert_same(got, expected, dtype):
    tol = DTYPES[dtype]
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol if tol else 1e-6, equal_nan=True)


# indices include blocks past the bottom/right edge and windows reaching outside on every side
INDICES = torch.tensor([[0, 0], [1, 2], [3, 2], [2, 0], [0, 2]])


@pytest.mark.parametrize("mode,dtype,layout,batch", itertools.product(
    ["constant", "replicate", "reflect"], DTYPES, LAYOUTS, [1, 3]))
def test_gather_matches_reference(mode, dtype, layout, batch):
    x = _full(batch, dtype, layout)
    args = (INDICES, [6, 5], [4, 4], [-1, -2], mode, -3.0, None, None, "none", 0.0)
    _assert_same(sigec.gather(x, *args), REFERENCE_KERNELS["gather"](x, *args), dtype)


@pytest.mark.parametrize("activation,dtype,layout", itertools.product(ACTIVATIONS, DTYPES, LAYOUTS))
def test_gather_with_affine_and_activation_matches_reference(activation, dtype, layout):
    x = _full(2, dtype, layout)
    x[0, 1, 2, 3] = float("nan")  # activations keep NaN, as torch's do
    scale, shift = torch.rand(2, 5) + 0.5, torch.randn(2, 5)
    args = (INDICES, [6, 6], [4, 4], [-1, -1], "constant", 0.0, scale, shift, activation, 0.2)
    _assert_same(sigec.gather(x, *args), REFERENCE_KERNELS["gather"](x, *args), dtype)


@pytest.mark.parametrize("activation,dtype", itertools.product(["none", "silu"], DTYPES))
def test_gather_cat_matches_reference(activation, dtype):
    xs = [_full(2, dtype, torch.contiguous_format, (3, 13, 11)), _full(2, dtype, torch.channels_last)]
    scale, shift = torch.rand(2, 8) + 0.5, torch.randn(2, 8)
    args = (INDICES, [6, 6], [4, 4], [-1, -1], "replicate", 0.0, scale, shift, activation, 0.0)
    _assert_same(sigec.gather_cat(xs, *args), REFERENCE_KERNELS["gather_cat"](xs, *args), dtype)


@pytest.mark.parametrize("dtype,layout,batch,blocks_layout", itertools.product(DTYPES, LAYOUTS, [1, 2], LAYOUTS))
def test_inplace_scatter_and_fused_gather_match_reference(dtype, layout, batch, blocks_layout):
    # channels-last blocks into a channels-last base take the row-copy kernel
    blocks = torch.randn(len(INDICES) * batch, 5, 4, 4).to(dtype).to(memory_format=blocks_layout)
    native_base, reference_base = _full(batch, dtype, layout), None
    reference_base = native_base.clone()
    sigec.scatter_(native_base, blocks, INDICES, [4, 4])
    REFERENCE_KERNELS["scatter_"](reference_base, blocks, INDICES, [4, 4])
    assert torch.equal(native_base, reference_base)
    assert native_base.is_contiguous(memory_format=layout)
    gather_args = (INDICES[:3], [6, 6], [4, 4], [-1, -1], "replicate", 0.0)
    got = sigec.scatter_gather_(native_base, blocks * 2, INDICES, [4, 4], *gather_args)
    want = REFERENCE_KERNELS["scatter_gather_"](reference_base, blocks * 2, INDICES, [4, 4], *gather_args)
    assert torch.equal(native_base, reference_base)
    _assert_same(got, want, dtype)


@pytest.mark.parametrize("dtype,layout", itertools.product(DTYPES, LAYOUTS))
def test_residual_add_matches_reference(dtype, layout):
    residual = _full(2, dtype, layout)
    blocks = torch.randn(len(INDICES) * 2, 5, 4, 4).to(dtype)
    args = (blocks, residual, INDICES, [4, 4])
    _assert_same(sigec.residual_add(*args), REFERENCE_KERNELS["residual_add"](*args), dtype)


@pytest.mark.parametrize("activation,dtype,layout", itertools.product(ACTIVATIONS, DTYPES, LAYOUTS))
def test_affine_act_matches_reference(activation, dtype, layout):
    x = torch.randn(6, 5, 4, 4).to(dtype).to(memory_format=layout)  # blocks of a batch of 2
    scale, shift = torch.rand(2, 5) + 0.5, torch.randn(2, 5)
    got = sigec.affine_act(x, scale, shift, activation, 0.1)
    want = REFERENCE_KERNELS["affine_act"](x, scale, shift, activation, 0.1)
    _assert_same(got, want, dtype)
    assert got.stride() == want.stride()


@pytest.mark.parametrize("activation,dtype", itertools.product(["none", "silu", "gelu"], [torch.bfloat16, torch.float16]))
def test_narrow_dtype_prologue_over_runs_longer_than_its_float_buffer(activation, dtype):
    # bf16 and fp16 planes are transformed through a float buffer of 512 values: planes of
    # 33x33 = 1089 values cross two buffer boundaries, with a NaN and large values on the way
    x = torch.randn(4, 3, 33, 33) * 4
    x[1, 2, 20, 7], x[2, 0, 16, 0], x[3, 1, 0, 3] = float("nan"), 3e4, -3e4
    x = x.to(dtype)
    scale, shift = torch.rand(2, 3) + 0.5, torch.randn(2, 3)
    got = sigec.affine_act(x, scale, shift, activation, 0.0)
    _assert_same(got, REFERENCE_KERNELS["affine_act"](x, scale, shift, activation, 0.0), dtype)
    full = x[:2].contiguous()
    args = (torch.tensor([[0, 0]]), [33, 33], [33, 33], [0, 0], "constant", 0.0, scale, shift, activation, 0.0)
    _assert_same(sigec.gather(full, *args), REFERENCE_KERNELS["gather"](full, *args), dtype)


def test_bf16_prologue_rounds_as_torch_does():
    # with no activation and an exact affine (scale 1, shift 0) the float buffer must round back
    # to the very bf16 values it read, NaN included
    x = (torch.randn(2, 4, 40, 40) * 1e3).to(torch.bfloat16)
    x[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), 1e-30])  # -0.0 + 0.0 is +0.0
    got = sigec.affine_act(x, torch.ones(1, 4), torch.zeros(1, 4), "none", 0.0)
    assert torch.equal(got.view(torch.int16)[~x.isnan()], x.view(torch.int16)[~x.isnan()])
    assert got.isnan().sum() == 1
    # and a scaled value rounds to nearest even, as Tensor.to(torch.bfloat16)
    y = torch.randn(1, 2, 30, 30).to(torch.bfloat16)
    scale, shift = torch.full((1, 2), 1.37), torch.full((1, 2), 0.011)
    expected = (y.float() * 1.37 + 0.011).to(torch.bfloat16)
    assert (sigec.affine_act(y, scale, shift, "none", 0.0).float() - expected.float()).abs().max() <= \
        expected.float().abs().max() * 2 ** -8


@pytest.mark.parametrize("dtype,layout", itertools.product(DTYPES, LAYOUTS))
@pytest.mark.parametrize("kernel,stride", [((3, 3), (1, 1)), ((1, 1), (1, 1)), ((3, 2), (2, 1)), ((4, 4), (2, 2))])
def test_im2col_matches_reference(dtype, layout, kernel, stride):
    windows = torch.randn(3, 5, 7, 6).to(dtype).to(memory_format=layout)
    got = sigec.im2col(windows, list(kernel), list(stride))
    assert torch.equal(got, REFERENCE_KERNELS["im2col"](windows, list(kernel), list(stride)))  # a pure copy


@pytest.mark.parametrize("blocks,kernel,stride,dilation,groups,bias", [
    (3, 3, 1, 1, 1, True), (3, 1, 1, 1, 1, False), (2, 3, 2, 1, 1, True), (2, 3, 1, 2, 1, True),
    (2, 3, 1, 1, 2, True), (40, 3, 1, 1, 1, True),  # dilated, grouped and past the GEMM threshold: oneDNN
])
def test_conv_windows_matches_reference(blocks, kernel, stride, dilation, groups, bias):
    windows, weight = torch.randn(blocks, 4, 8, 8), torch.randn(6, 4 // groups, kernel, kernel)
    args = (windows, weight, torch.randn(6) if bias else None, [stride] * 2, [dilation] * 2, groups)
    got = sigec.conv_windows(*args)
    assert got.is_contiguous()
    # float32 sums in another order (the few-rows kernel): a few ulps of the result
    torch.testing.assert_close(got, REFERENCE_KERNELS["conv_windows"](*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blocks,channels,out_channels", [(1, 3, 1), (5, 37, 6), (28, 16, 130), (96, 8, 5), (97, 8, 5),
                                                      (11, 64, 67), (33, 8, 25), (49, 16, 13), (80, 8, 7), (81, 8, 7),
                                                      (70, 256, 30), (91, 40, 9), (160, 64, 13), (256, 8, 7),
                                                      (257, 8, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_windows_few_rows_product_matches_float64(blocks, channels, out_channels, bias):
    # up to 256 output rows in float32 (80 on an Intel CPU, 96 without AVX-512) take the few-rows
    # kernels: chunks of 1 to 5 vectors of rows against 16 to 5 weight rows, or 4 x 4 dot-product
    # tiles, with partial tiles, depths (channels x 9) with and without a tail past a multiple of
    # 16, and past the depth chunk
    windows, weight = torch.randn(blocks, channels, 3, 3), torch.randn(out_channels, channels, 3, 3)
    b = torch.randn(out_channels) if bias else None
    got = sigec.conv_windows(windows, weight, b, [1, 1], [1, 1], 1)
    expected = torch.nn.functional.conv2d(windows.double(), weight.double(), None if b is None else b.double())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    # a weight in another layout takes the library product, with the same result
    channels_last = sigec.conv_windows(windows, weight.contiguous(memory_format=torch.channels_last), b, [1, 1], [1, 1], 1)
    torch.testing.assert_close(channels_last, got, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape,depth,out", [((1, 3), 3, 1), ((2, 3, 6), 37, 6), ((96, 1), 2100, 5), ((97,), 20, 9),
                                             ((7, 4, 4), 64, 67), ((300,), 16, 8), ((80,), 2100, 13), ((81,), 20, 9),
                                             ((40,), 4500, 31), ((91,), 700, 37), ((200,), 2100, 19), ((16, 16), 30, 70),
                                             ((257,), 20, 9)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_float64(shape, depth, out, bias):
    # up to 256 rows in float32 (80 on an Intel CPU, 96 without AVX-512) take the few-rows kernels
    # (partial tiles, several chunks of rows, depth tails, past the depth chunk); more rows, F.linear
    x, weight = torch.randn(*shape, depth), torch.randn(out, depth)
    b = torch.randn(out) if bias else None
    got = sigec.linear(x, weight, b)
    assert got.shape == (*shape, out) and got.is_contiguous()
    expected = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got, REFERENCE_KERNELS["linear"](x, weight, b), rtol=1e-5, atol=1e-4)


_DOT_TILES_CHECK = """
import torch
from sigec.runtime import native
assert native.load()
torch.manual_seed(0)
for rows, depth, out in [(1, 3, 1), (5, 37, 6), (28, 2100, 130), (81, 40, 5), (96, 19, 7)]:
    x, w, b = torch.randn(rows, depth), torch.randn(out, depth), torch.randn(out)
    got = torch.ops.sigec.linear(x, w, b).double()
    expected = torch.nn.functional.linear(x.double(), w.double(), b.double())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
windows, weight, b = torch.randn(9, 16, 4, 4), torch.randn(70, 16, 3, 3), torch.randn(70)
got = torch.ops.sigec.conv_windows(windows, weight, b, [1, 1], [1, 1], 1).double()
expected = torch.nn.functional.conv2d(windows.double(), weight.double(), b.double())
torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
print("ok")
"""


def test_few_rows_dot_product_tiles_match_float64():
    # the kernel of machines without AVX-512, forced on this one (the choice is made once per process)
    import subprocess
    import sys

    env = dict(os.environ, SIGEC_NATIVE_NO_AVX512="1")
    done = subprocess.run([sys.executable, "-c", _DOT_TILES_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_in_other_dtypes_and_strides_is_f_linear(dtype):
    x, weight, b = torch.randn(5, 3, 24).to(dtype), torch.randn(7, 24).to(dtype), torch.randn(7).to(dtype)
    assert torch.equal(sigec.linear(x, weight, b), torch.nn.functional.linear(x, weight, b))
    x, weight = torch.randn(24, 5).t(), torch.randn(24, 7).t()  # transposed: not contiguous
    torch.testing.assert_close(sigec.linear(x, weight, None), x @ weight.t(), rtol=1e-5, atol=1e-5)


def test_im2col_refuses_windows_smaller_than_the_kernel():
    with pytest.raises(ValueError, match="smaller than the kernel"):
        sigec.im2col(torch.randn(1, 2, 2, 2), [3, 3], [1, 1])


def test_empty_block_lists_and_bad_arguments():
    x = torch.randn(1, 2, 8, 8)
    none = torch.zeros(0, 2, dtype=torch.int64)
    assert sigec.gather(x, none, [4, 4], [4, 4], [0, 0], "constant", 0.0, None, None, "none", 0.0).shape == (0, 2, 4, 4)
    before = x.clone()
    sigec.scatter_(x, torch.zeros(0, 2, 4, 4), none, [4, 4])
    assert torch.equal(x, before)
    with pytest.raises(ValueError, match="pad_mode"):
        sigec.gather(x, torch.tensor([[0, 0]]), [4, 4], [4, 4], [0, 0], "circular", 0.0, None, None, "none", 0.0)
    with pytest.raises(ValueError, match="NCHW-contiguous or channels-last"):
        sigec.scatter_(torch.randn(1, 2, 8, 16)[..., ::2], torch.zeros(1, 2, 4, 4), torch.tensor([[0, 0]]), [4, 4])


def test_reference_kernels_context_switches_and_restores():
    x = torch.randn(1, 3, 8, 8)
    idx = torch.tensor([[0, 1]])
    with torch.profiler.profile() as prof:  # outside the filter: on CUDA builds the profiler warns itself
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with native.reference_kernels():
                sigec.gather(x, idx, [4, 4], [4, 4], [0, 0], "constant", 0.0, None, None, "none", 0.0)
    # the reference gather is built from aten.index_select; the native one calls no aten op
    assert any(e.name == "aten::index_select" for e in prof.events())
    with torch.profiler.profile() as prof:
        sigec.gather(x, idx, [4, 4], [4, 4], [0, 0], "constant", 0.0, None, None, "none", 0.0)
    assert not any(e.name == "aten::index_select" for e in prof.events())


def test_missing_compiler_falls_back_with_one_warning(monkeypatch):
    state = dict(native._state)
    monkeypatch.setattr(native, "_state", {"tried": False, "loaded": False, "error": None})
    monkeypatch.setattr(native, "_sources", lambda: None)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert native.load() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.load() is False  # reported once
    assert "reference" in native.status()
    assert state["loaded"]  # the real kernels stay registered for the other tests


def test_large_outputs_reuse_freed_memory_and_stay_correct():
    # outputs of 1 MiB and more come from a cache of freed buffers (csrc/cpu_kernels.cpp, OutputPool)
    x = torch.randn(1, 64, 64, 64)
    grid = torch.stack(torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij"), -1).reshape(-1, 2)
    args = (grid, [10, 10], [8, 8], [-1, -1], "constant", 0.0, None, None, "none", 0.0)
    first = sigec.gather(x, *args)
    assert first.numel() * 4 >= 1 << 20
    address = first.data_ptr()
    first.fill_(float("nan"))  # what a reused buffer holds before the kernel writes it
    del first
    second = sigec.gather(x, *args)
    assert second.data_ptr() == address  # the same memory, ...
    torch.testing.assert_close(second, REFERENCE_KERNELS["gather"](x, *args), rtol=0, atol=0)  # ... fully rewritten
    third = sigec.gather(x, *args)
    assert third.data_ptr() != second.data_ptr()  # a live output is never handed out again
    torch.testing.assert_close(third, second, rtol=0, atol=0)
    # a slightly different size shares the size class: a smaller edit reuses the buffer
    del second
    fewer = sigec.gather(x, grid[:-1], *args[1:])
    assert fewer.data_ptr() == address and fewer.is_contiguous()
    torch.testing.assert_close(fewer, REFERENCE_KERNELS["gather"](x, grid[:-1], *args[1:]), rtol=0, atol=0)
    # the matrix-product path of conv_windows writes pooled buffers too
    windows = torch.randn(16, 256, 4, 4)
    weight, bias = torch.randn(128, 256, 3, 3), torch.randn(128)
    conv = sigec.conv_windows(windows, weight, bias, [1, 1], [1, 1], 1)
    torch.testing.assert_close(conv, REFERENCE_KERNELS["conv_windows"](windows, weight, bias, [1, 1], [1, 1], 1),
                               rtol=1e-4, atol=1e-4)  # sums of 2304 products, in another order
