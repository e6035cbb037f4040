"""The sparse ops: opcheck (fake tensors, schemas, strides) and agreement with plain loops."""
import pytest
import torch
import torch.nn.functional as F

from sigec.runtime import ops

sigec = torch.ops.sigec


def _naive_gather(x, indices, window, stride, offset, mode, value):
    n, c, h, w = x.shape
    pads = (8, 8, 8, 8)  # covers every window below; reflect needs pads under the image size
    xp = F.pad(x, pads, mode=mode, value=value) if mode == "constant" else F.pad(x, pads, mode=mode)
    out = []
    for r, col in indices.tolist():
        y0 = r * stride[0] + offset[0] + pads[2]
        x0 = col * stride[1] + offset[1] + pads[0]
        out.append(xp[:, :, y0:y0 + window[0], x0:x0 + window[1]])
    return torch.stack(out).reshape(-1, c, *window)


@pytest.mark.parametrize("mode", ["constant", "replicate", "reflect"])
@pytest.mark.parametrize("batch", [1, 3])
def test_gather_matches_padded_slicing(mode, batch):
    torch.manual_seed(0)
    x = torch.randn(batch, 5, 13, 11)
    indices = torch.tensor([[0, 0], [1, 2], [3, 2], [2, 0]])
    window, stride, offset = [6, 5], [4, 4], [-1, -2]
    got = sigec.gather(x, indices, window, stride, offset, mode, -3.0, None, None, "none", 0.0)
    torch.testing.assert_close(got, _naive_gather(x, indices, window, stride, offset, mode, -3.0))


def test_gather_affine_activation_keeps_padding_zero():
    x = torch.randn(2, 4, 8, 8)
    scale, shift = torch.rand(2, 4) + 0.5, torch.randn(2, 4)
    indices = torch.tensor([[0, 0], [1, 1]])
    got = sigec.gather(x, indices, [6, 6], [4, 4], [-1, -1], "constant", 0.0, scale, shift, "silu", 0.0)
    activated = F.silu(x * scale[:, :, None, None] + shift[:, :, None, None])
    torch.testing.assert_close(got, _naive_gather(activated, indices, [6, 6], [4, 4], [-1, -1], "constant", 0.0))


def _naive_scatter(base, blocks, indices, block):
    """``base`` with the (N-sample) blocks written at ``indices``, by slicing (a copy)."""
    out = base.clone()
    n, _, h, w = base.shape
    bh, bw = block
    for b, (r, col) in enumerate(indices.tolist()):
        rows, cols = min(bh, h - r * bh), min(bw, w - col * bw)
        out[:, :, r * bh:r * bh + rows, col * bw:col * bw + cols] = blocks[b * n:(b + 1) * n, :, :rows, :cols]
    return out


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_scatter_writes_blocks_in_place_and_clips_the_edge(layout):
    torch.manual_seed(0)
    base = torch.randn(2, 3, 10, 10).to(memory_format=layout)
    indices = torch.tensor([[0, 1], [2, 2]])  # block (2, 2) of 4x4 runs past the 10x10 edge
    blocks = torch.randn(4, 3, 4, 4)
    expect = _naive_scatter(base, blocks, indices, [4, 4])
    ptr = base.data_ptr()
    sigec.scatter_(base, blocks, indices, [4, 4])
    assert base.data_ptr() == ptr and base.is_contiguous(memory_format=layout)
    torch.testing.assert_close(base, expect, rtol=0, atol=0)
    windows = sigec.scatter_gather_(base, blocks * 2, indices, [4, 4], indices, [6, 6], [4, 4], [-1, -1],
                                    "constant", 0.0)
    expect = _naive_scatter(expect, blocks * 2, indices, [4, 4])
    torch.testing.assert_close(base, expect, rtol=0, atol=0)
    torch.testing.assert_close(windows, _naive_gather(expect, indices, [6, 6], [4, 4], [-1, -1], "constant", 0.0))


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_scatter_rounds_wider_blocks_into_a_narrow_cache(stored):
    """A cache stored in ``cache_dtype`` is a working buffer too: the blocks are rounded into it."""
    torch.manual_seed(0)
    base = torch.randn(1, 3, 8, 8).to(stored)
    indices = torch.tensor([[1, 0]])
    blocks = torch.randn(1, 3, 4, 4)
    expect = _naive_scatter(base, blocks.to(stored), indices, [4, 4])
    sigec.scatter_(base, blocks, indices, [4, 4])
    assert base.dtype == stored
    torch.testing.assert_close(base, expect, rtol=0, atol=0)


def test_residual_add_adds_the_residual_at_the_blocks():
    base = torch.randn(1, 3, 8, 8)
    idx = torch.tensor([[1, 0]])
    blocks = torch.randn(1, 3, 4, 4)
    res = sigec.residual_add(blocks, base, idx, [4, 4])
    torch.testing.assert_close(res, blocks + base[:, :, 4:8, 0:4])


def test_inplace_scatter_refuses_other_layouts():
    base = torch.randn(1, 3, 8, 16)[..., ::2]  # strided: neither NCHW-contiguous nor channels-last
    with pytest.raises(ValueError, match="NCHW-contiguous or channels-last"):
        sigec.scatter_(base, torch.randn(1, 3, 4, 4), torch.tensor([[0, 0]]), [4, 4])


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_gather_cat_reads_the_concatenation_without_building_it(mode):
    xs = [torch.randn(2, 3, 9, 9), torch.randn(2, 5, 9, 9).to(memory_format=torch.channels_last)]
    idx = torch.tensor([[0, 0], [2, 1]])
    scale, shift = torch.rand(2, 8), torch.randn(2, 8)
    args = (idx, [6, 6], [4, 4], [-1, -1], mode, 0.0, scale, shift, "silu", 0.0)
    torch.testing.assert_close(sigec.gather_cat(xs, *args), sigec.gather(torch.cat(xs, 1), *args))


def test_norm_affine_reproduces_group_norm():
    x = torch.randn(2, 8, 6, 6)
    w, b = torch.randn(8), torch.randn(8)
    scale, shift = sigec.norm_affine(x, 4, w, b, 1e-5)
    got = sigec.affine_act(x, scale, shift, "none", 0.0)
    torch.testing.assert_close(got, F.group_norm(x, 4, w, b, 1e-5), rtol=1e-5, atol=1e-5)


def test_empty_block_lists():
    x = torch.randn(1, 2, 8, 8)
    none = torch.zeros(0, 2, dtype=torch.int64)
    assert sigec.gather(x, none, [4, 4], [4, 4], [0, 0], "constant", 0.0, None, None, "none", 0.0).shape == (0, 2, 4, 4)
    y = x.clone()
    sigec.scatter_(y, torch.zeros(0, 2, 4, 4), none, [4, 4])
    assert torch.equal(y, x)


@pytest.mark.parametrize("blocks,kernel,stride,dilation,groups,bias", [
    (3, 3, 1, 1, 1, True), (3, 1, 1, 1, 1, False), (2, 3, 2, 1, 1, True), (2, 3, 1, 2, 1, True),
    (2, 3, 1, 1, 2, True), (300, 3, 1, 1, 1, True),  # grouped, and past GEMM_MAX_OUTPUTS: oneDNN
])
def test_conv_windows_is_conv2d_without_padding(blocks, kernel, stride, dilation, groups, bias):
    torch.manual_seed(0)
    windows = torch.randn(blocks, 4, 8, 8)
    weight = torch.randn(6, 4 // groups, kernel, kernel)
    b = torch.randn(6) if bias else None
    out = sigec.conv_windows(windows, weight, b, [stride] * 2, [dilation] * 2, groups)
    expected = torch.nn.functional.conv2d(windows, weight, b, stride, 0, dilation, groups)
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _opcheck_samples():
    x = torch.randn(2, 4, 9, 9)
    xcl = x.to(memory_format=torch.channels_last)
    idx = torch.tensor([[0, 0], [2, 1]])
    blocks = torch.randn(4, 4, 4, 4)
    scale, shift = torch.rand(2, 4), torch.randn(2, 4)
    return [
        (sigec.gather.default, (x, idx, [6, 6], [4, 4], [-1, -1], "constant", 0.0, None, None, "none", 0.0)),
        (sigec.gather.default, (xcl, idx, [6, 6], [4, 4], [-1, -1], "reflect", 0.0, scale, shift, "silu", 0.0)),
        (sigec.gather_cat.default, ([x, xcl[:, :2]], idx, [6, 6], [4, 4], [-1, -1], "constant", 0.0,
                                    torch.rand(2, 6), torch.randn(2, 6), "silu", 0.0)),
        (sigec.scatter_.default, (x.clone(), blocks, idx, [4, 4])),
        (sigec.scatter_.default, (xcl.clone(), blocks, idx, [4, 4])),
        (sigec.scatter_gather_.default, (xcl.clone(), blocks, idx, [4, 4], idx, [5, 5], [4, 4], [0, 0], "reflect", 0.0)),
        (sigec.residual_add.default, (blocks, x, idx, [4, 4])),
        (sigec.affine_act.default, (blocks, scale, shift, "gelu", 0.0)),
        (sigec.affine_act.default, (xcl, scale, shift, "leaky_relu", 0.2)),
        (sigec.tile_blocks.default, (torch.randn(2, 4, 1, 1), blocks)),
        (sigec.norm_affine.default, (x, 2, torch.randn(4), None, 1e-5)),
        (sigec.conv_windows.default, (torch.randn(4, 4, 6, 6), torch.randn(3, 4, 3, 3), torch.randn(3), [1, 1], [1, 1], 1)),
        (sigec.conv_windows.default, (xcl, torch.randn(3, 4, 3, 3), None, [2, 2], [1, 1], 1)),
        (sigec.im2col.default, (torch.randn(3, 4, 6, 5), [3, 2], [1, 2])),
        (sigec.im2col.default, (xcl, [1, 1], [1, 1])),
        (sigec.linear.default, (torch.randn(3, 2, 5), torch.randn(6, 5), torch.randn(6))),
        (sigec.linear.default, (torch.randn(200, 5), torch.randn(6, 5), None)),
    ]


@pytest.mark.parametrize("i", range(len(_opcheck_samples())))
def test_opcheck(i):
    op, args = _opcheck_samples()[i]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_every_op_is_opchecked():
    checked = {op for op, _ in _opcheck_samples()}
    assert checked == set(ops.ALL_OPS.values())


def test_dense_conv_input_takes_the_weights_layout_when_the_input_is_smaller():
    from sigec.runtime.ops import dense_conv_input

    weight = torch.randn(64, 32, 3, 3)
    small = torch.randn(1, 32, 4, 4).to(memory_format=torch.channels_last)
    big = torch.randn(1, 32, 64, 64).to(memory_format=torch.channels_last)
    nchw = torch.randn(1, 32, 4, 4)
    out = dense_conv_input(small, weight)
    assert out.is_contiguous() and torch.equal(out, small)
    assert dense_conv_input(big, weight) is big  # copying the weight is cheaper than the input
    assert dense_conv_input(nchw, weight) is nchw
    # the same convolution by oneDNN in two layouts: its algorithms sum the 288 products in
    # different orders (on an AVX-512 Xeon they differ by up to about 1e-5)
    torch.testing.assert_close(F.conv2d(out, weight, padding=1), F.conv2d(small, weight, padding=1),
                               rtol=1e-5, atol=1e-4)


def test_dense_convolutions_of_the_incremental_graph_adapt_their_input_layout():
    import sigec as sigec_api
    from sigec.runtime.ops import dense_conv_input

    class LowRes(torch.nn.Module):
        """A token-like (channels-last) value into a dense convolution, as after UNet attention."""

        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 64, 3, padding=1)
            self.b = torch.nn.Conv2d(64, 64, 3, padding=1)

        def forward(self, x):
            h = self.a(x).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last strides
            return self.b(F.avg_pool2d(h, 8))

    torch.manual_seed(0)
    model, x = LowRes().eval(), torch.randn(1, 3, 32, 32)
    engine = sigec_api.compile(model, (x,), policy="exact", block_size=4)
    engine(x)
    x2 = x.clone()
    x2[..., 3:6, 3:6] += 1
    with torch.no_grad():
        torch.testing.assert_close(engine(x2), model(x2), rtol=1e-4, atol=1e-5)
    targets = [n.target for plan in engine.plans for n in plan.incremental.graph.nodes]
    dense_convs = [t for t in targets if t in (torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default)]
    assert dense_convs and targets.count(dense_conv_input) == len(dense_convs)
