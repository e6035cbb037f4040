"""CUDA kernels (csrc/cuda_kernels.cu), their build, and the incremental runners (sigec/core/cuda_graphs.py).

* Emulation, on every machine with a C++ compiler: the CUDA source compiled by the host compiler
  with -DSIGEC_CUDA_EMULATE runs the kernels' element functions in a host loop. Checked against
  the reference kernels: index arithmetic (32- and 64-bit), layouts, 16-byte packs, dtypes.
* nvcc (slow, where nvcc exists): the source compiles for sm_90 with the JIT build's flags.
* GPU (skipped without one): the real kernels against the references, opcheck on CUDA tensors,
  no host synchronization, engines on CUDA, CUDA-graph replay equal to eager.
* The runners' host logic runs on the CPU with a recorder standing in for CUDA graph capture.
"""
import hashlib
import itertools
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sigec
from sigec.core import cuda_graphs
from sigec.runtime import ReferenceRuntime, native, token_ops
from sigec.runtime.ops import ACTIVATIONS, REFERENCE_KERNELS

sigec_ops = torch.ops.sigec
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# kernels compute in float and round once; the references may round in between (fp32: fused
# multiply-add on the GPU)
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = tuple(TOLERANCE)
LAYOUTS = (torch.contiguous_format, torch.channels_last)
# blocks past the bottom/right edge, windows reaching outside on every side
INDICES = torch.tensor([[0, 0], [1, 2], [3, 2], [2, 0], [0, 2]])


def _assert_close(got, expected, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.cpu(), expected.cpu(), rtol=tol, atol=tol, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# emulation: the CUDA kernels' element functions on the host

_EMULATION: dict = {}


def _load_emulation():
    """Build csrc/cuda_kernels.cu with the host compiler (-DSIGEC_CUDA_EMULATE) once per process."""
    if "ops" not in _EMULATION:
        from torch.utils import cpp_extension

        source = native.cuda_source()
        # every csrc file the .cu reads (torch's build cache hashes only the listed sources)
        text_in = source.read_bytes() + (source.parent / "kernel_common.h").read_bytes()
        digest = hashlib.sha256(text_in).hexdigest()[:16]
        build = os.path.join(cpp_extension.get_default_build_root(), "sigec_cuda_emulated_src")
        os.makedirs(build, exist_ok=True)
        wrapper = os.path.join(build, "cuda_kernels_emulated.cpp")
        text = f'// {digest}\n#define SIGEC_CUDA_EMULATE 1\n#include "{source}"\n'
        if not os.path.exists(wrapper) or open(wrapper).read() != text:
            with open(wrapper, "w") as f:
                f.write(text)
        # the native builds' link flags: a private libstdc++ where the toolchain links it statically
        cpp_extension.load("sigec_cuda_emulated", [wrapper], extra_cflags=["-O1"],
                           extra_ldflags=list(native.LINK_FLAGS), is_python_module=False)
        _EMULATION["ops"] = torch.ops.sigec_cuda_emulated
    return _EMULATION["ops"]


@pytest.fixture(scope="module")
def emu():
    if os.environ.get("SIGEC_NATIVE") == "0" or not native.load():
        pytest.skip("no C++ compiler for the host build of the CUDA kernels")
    return _load_emulation()


@pytest.fixture(params=["index32", "index64"])
def kernels(request, emu):
    """The emulated kernels with 32-bit index arithmetic, or forced to the 64-bit path."""
    emu.set_index32_limit(2**31 - 1 if request.param == "index32" else 0)
    yield emu
    emu.set_index32_limit(2**31 - 1)


def _full(batch, dtype, layout, shape=(5, 13, 11)):
    return torch.randn(batch, *shape).to(dtype).to(memory_format=layout)


@pytest.mark.parametrize("mode,dtype,layout,batch", itertools.product(
    ["constant", "replicate", "reflect"], DTYPES, LAYOUTS, [1, 3]))
def test_emulated_gather_matches_reference(kernels, mode, dtype, layout, batch):
    x = _full(batch, dtype, layout)
    args = (INDICES, [6, 5], [4, 4], [-1, -2], mode, -3.0, None, None, "none", 0.0)
    _assert_close(kernels.gather(x, *args), REFERENCE_KERNELS["gather"](x, *args), dtype)


@pytest.mark.parametrize("activation,dtype,layout", itertools.product(ACTIVATIONS, DTYPES, LAYOUTS))
def test_emulated_gather_with_affine_and_activation_matches_reference(emu, activation, dtype, layout):
    x = _full(2, dtype, layout)
    x[0, 1, 2, 3] = float("nan")  # activations keep NaN, as torch's do
    scale, shift = torch.rand(2, 5) + 0.5, torch.randn(2, 5)
    args = (INDICES, [6, 6], [4, 4], [-1, -1], "constant", 0.0, scale, shift, activation, 0.2)
    _assert_close(emu.gather(x, *args), REFERENCE_KERNELS["gather"](x, *args), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_gather_cat_equals_gathers_of_each_source(kernels, dtype):
    xs = [_full(2, dtype, torch.contiguous_format, (3, 13, 11)), _full(2, dtype, torch.channels_last)]
    scale, shift = torch.rand(2, 8) + 0.5, torch.randn(2, 8)
    common = (INDICES, [6, 6], [4, 4], [-1, -1], "reflect", 0.0)
    got = kernels.gather_cat(xs, *common, scale, shift, "silu", 0.0)
    parts = [REFERENCE_KERNELS["gather"](xs[0], *common, scale[:, :3], shift[:, :3], "silu", 0.0),
             REFERENCE_KERNELS["gather"](xs[1], *common, scale[:, 3:], shift[:, 3:], "silu", 0.0)]
    _assert_close(got, torch.cat(parts, dim=1), dtype)


# (tensor width, block): the second geometry lets rows move as 16-byte packs for every dtype
GEOMETRIES = {"scalar": (11, [4, 4]), "packed": (16, [4, 8])}


@pytest.mark.parametrize("dtype,layout,batch,geometry", itertools.product(DTYPES, LAYOUTS, [1, 2], GEOMETRIES))
def test_emulated_inplace_scatter_and_fused_gather_match_reference(kernels, dtype, layout, batch, geometry):
    width, block = GEOMETRIES[geometry]
    indices = torch.tensor([[0, 0], [1, 1], [3, 1], [2, 0]])  # row 3 runs past the 13-row edge
    blocks = torch.randn(len(indices) * batch, 5, *block).to(dtype)
    got_base = _full(batch, dtype, layout, (5, 13, width))
    want_base = got_base.clone()
    kernels.scatter_(got_base, blocks, indices, block)
    REFERENCE_KERNELS["scatter_"](want_base, blocks, indices, block)
    assert torch.equal(got_base, want_base) and got_base.is_contiguous(memory_format=layout)
    gather_args = (indices[:3], [6, 6], [4, 4], [-1, -1], "replicate", 0.0)
    got = kernels.scatter_gather_(got_base, blocks * 2, indices, block, *gather_args)
    want = REFERENCE_KERNELS["scatter_gather_"](want_base, blocks * 2, indices, block, *gather_args)
    assert torch.equal(got_base, want_base)
    _assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype,layout,geometry", itertools.product(DTYPES, LAYOUTS, GEOMETRIES))
def test_emulated_residual_add_matches_reference(kernels, dtype, layout, geometry):
    width, block = GEOMETRIES[geometry]
    indices = torch.tensor([[0, 0], [1, 1], [3, 1], [2, 0]])
    residual = _full(2, dtype, layout, (5, 13, width))
    blocks = torch.randn(len(indices) * 2, 5, *block).to(dtype)
    args = (blocks, residual, indices, block)
    _assert_close(kernels.residual_add(*args), REFERENCE_KERNELS["residual_add"](*args), dtype)


def test_emulated_residual_add_promotes_mixed_dtypes(emu):
    residual = _full(2, torch.float16, torch.contiguous_format, (5, 13, 16))
    blocks = torch.randn(8, 5, 4, 8)
    args = (blocks, residual, torch.tensor([[0, 0], [1, 1], [3, 1], [2, 0]]), [4, 8])
    got, want = emu.residual_add(*args), REFERENCE_KERNELS["residual_add"](*args)
    assert got.dtype == want.dtype == torch.float32
    _assert_close(got, want, torch.float32)


@pytest.mark.parametrize("activation,dtype,layout,plane", itertools.product(
    ACTIVATIONS, DTYPES, LAYOUTS, [(4, 4), (3, 5)]))
def test_emulated_affine_act_matches_reference(kernels, activation, dtype, layout, plane):
    x = torch.randn(6, 5, *plane).to(dtype).to(memory_format=layout)  # blocks of a batch of 2
    scale, shift = torch.rand(2, 5) + 0.5, torch.randn(2, 5)
    got = kernels.affine_act(x, scale, shift, activation, 0.1)
    want = REFERENCE_KERNELS["affine_act"](x, scale, shift, activation, 0.1)
    _assert_close(got, want, dtype)
    assert got.stride() == want.stride()


@pytest.mark.parametrize("dtype,channels,strided", itertools.product(DTYPES, [5, 16], [False, True]))
def test_emulated_token_ops_match_reference(kernels, dtype, channels, strided):
    if strided:  # tokens of an NCHW image: (N, C, H, W) -> (N, H*W, C), channel stride H*W
        x = torch.randn(2, channels, 3, 4).to(dtype).flatten(2).transpose(1, 2)
    else:
        x = torch.randn(2, 12, channels).to(dtype)
    indices = torch.tensor([7, 0, 11, 3])
    assert torch.equal(kernels.token_gather(x, indices), token_ops.token_gather_reference(x, indices))
    tokens = torch.randn(2, len(indices), channels)
    got, want = x.clone(), x.clone()
    kernels.token_scatter_(got, tokens, indices)
    token_ops.token_scatter_inplace_reference(want, tokens, indices)
    assert torch.equal(got, want)


def test_emulated_kernels_refuse_bad_arguments(emu):
    x = torch.randn(1, 2, 8, 8)
    none = torch.zeros(0, 2, dtype=torch.int64)
    assert emu.gather(x, none, [4, 4], [4, 4], [0, 0], "constant", 0.0, None, None, "none", 0.0).shape == (0, 2, 4, 4)
    before = x.clone()
    emu.scatter_(x, torch.zeros(0, 2, 4, 4), none, [4, 4])
    assert torch.equal(x, before)
    with pytest.raises(ValueError, match="pad_mode"):
        emu.gather(x, torch.tensor([[0, 0]]), [4, 4], [4, 4], [0, 0], "circular", 0.0, None, None, "none", 0.0)
    with pytest.raises(ValueError, match="int64"):
        emu.gather(x, torch.tensor([[0, 0]], dtype=torch.int32), [4, 4], [4, 4], [0, 0], "constant", 0.0, None, None,
                   "none", 0.0)
    with pytest.raises(ValueError, match="NCHW-contiguous or channels-last"):
        emu.scatter_(torch.randn(1, 2, 8, 16)[..., ::2], torch.zeros(1, 2, 4, 4), torch.tensor([[0, 0]]), [4, 4])
    with pytest.raises(ValueError, match="blocks must be"):
        emu.scatter_(x, torch.zeros(2, 2, 4, 4), torch.tensor([[0, 0]]), [4, 4])
    with pytest.raises(ValueError, match="scale and shift"):
        emu.gather(x, torch.tensor([[0, 0]]), [4, 4], [4, 4], [0, 0], "constant", 0.0, torch.ones(1, 2), None, "none", 0.0)
    with pytest.raises(IndexError, match="out of range"):
        emu.token_gather(torch.randn(1, 4, 2), torch.tensor([4]))


# ---------------------------------------------------------------------------------------------
# build


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cuda_build_is_a_silent_no_op_without_cuda():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.load_cuda() is False
        assert native.load() == native.available()
    assert native.cuda_unavailable_reason() is not None
    assert not native.cuda_available() and "no CUDA kernels" in native.cuda_status()


@pytest.mark.slow
@pytest.mark.skipif(native._nvcc() is None, reason="needs nvcc")
def test_cuda_source_compiles_with_nvcc():
    obj = native.check_cuda_compile("90")
    data = obj.read_bytes()
    assert b".nv_fatbin" in data  # device code was generated ...
    for op in ("GatherOp", "ScatterOp", "ResidualOp", "AffineOp", "TokenGatherOp", "TokenScatterOp"):
        assert op.encode() in data, op  # ... for every element function


# ---------------------------------------------------------------------------------------------
# the real kernels (GPU)


def _on(device, args):
    if isinstance(args, torch.Tensor):
        return args.to(device)
    if isinstance(args, (list, tuple)):
        return type(args)(_on(device, a) for a in args)
    return args


def _kernel_cases(dtype, layout):
    x = _full(2, dtype, layout, (5, 13, 16))
    blocks = torch.randn(len(INDICES) * 2, 5, 4, 8).to(dtype)
    scale, shift = torch.rand(2, 5) + 0.5, torch.randn(2, 5)
    image_tokens = torch.randn(2, 16, 3, 4).to(dtype).flatten(2).transpose(1, 2)
    token_idx = torch.tensor([7, 0, 11, 3])
    return [
        ("gather", (x, INDICES, [6, 10], [4, 8], [-1, -1], "reflect", 0.0, scale, shift, "silu", 0.0)),
        ("gather", (x, INDICES, [6, 10], [4, 8], [-1, -1], "constant", -2.0, None, None, "none", 0.0)),
        ("scatter_", (x.clone(), blocks, INDICES, [4, 8])),
        ("scatter_gather_", (x.clone(), blocks, INDICES, [4, 8], INDICES[:2], [6, 6], [4, 4], [-1, -1],
                             "replicate", 0.0)),
        ("residual_add", (blocks, x, INDICES, [4, 8])),
        ("affine_act", (blocks, scale, shift, "gelu", 0.0)),
        ("affine_act", (x, scale, shift, "leaky_relu", 0.2)),
        ("token_gather", (image_tokens, token_idx)),
        ("token_scatter_", (image_tokens.clone(), torch.randn(2, 4, 16), token_idx)),
    ]


REFERENCES = {**REFERENCE_KERNELS, **token_ops.REFERENCE_KERNELS}


@needs_gpu
def test_cuda_kernels_are_built_and_registered():
    native.load()
    assert native.cuda_available(), native.cuda_status()


@needs_gpu
@pytest.mark.parametrize("dtype,layout", itertools.product([torch.float32, torch.float16, torch.bfloat16], LAYOUTS))
def test_cuda_kernels_match_reference(dtype, layout):
    assert native.load_cuda(), native.cuda_status()
    for name, args in _kernel_cases(dtype, layout):
        cpu_args = list(args)
        gpu_args = _on("cuda", cpu_args)
        got = getattr(sigec_ops, name)(*gpu_args)
        want = REFERENCES[name](*cpu_args)
        if name.endswith("_"):  # in place: the written tensor is what counts
            _assert_close(gpu_args[0], cpu_args[0], dtype)
        if want is not None:
            _assert_close(got, want, dtype)


@needs_gpu
def test_cuda_kernels_refuse_bad_arguments():
    # error messages that format numbers (shapes, strides) exercise the library's own libstdc++
    assert native.load_cuda(), native.cuda_status()
    x = torch.randn(1, 2, 8, 8, device="cuda")
    one = torch.tensor([[0, 0]], device="cuda")
    with pytest.raises(ValueError, match="NCHW-contiguous or channels-last"):
        sigec_ops.scatter_(torch.randn(1, 2, 8, 16, device="cuda")[..., ::2], torch.zeros(1, 2, 4, 4, device="cuda"),
                           one, [4, 4])
    with pytest.raises(ValueError, match="blocks must be"):
        sigec_ops.scatter_(x, torch.zeros(2, 2, 4, 4, device="cuda"), one, [4, 4])
    with pytest.raises(ValueError, match="scale and shift"):
        sigec_ops.gather(x, one, [4, 4], [4, 4], [0, 0], "constant", 0.0, torch.ones(1, 3, device="cuda"),
                         torch.ones(1, 3, device="cuda"), "none", 0.0)
    with pytest.raises(ValueError, match="keep the block indices on the tensor's device"):
        sigec_ops.gather(x, one.cpu(), [4, 4], [4, 4], [0, 0], "constant", 0.0, None, None, "none", 0.0)


@needs_gpu
def test_cuda_kernels_do_not_synchronize():
    assert native.load_cuda(), native.cuda_status()
    cases = [(name, _on("cuda", args)) for name, args in _kernel_cases(torch.float16, torch.contiguous_format)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for name, args in cases:
            getattr(sigec_ops, name)(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _cuda_opcheck_samples():
    from tests.runtime.test_ops import _opcheck_samples
    from tests.runtime.test_token_ops import _opcheck_samples as token_samples

    return [(op, _on("cuda", args)) for op, args in _opcheck_samples() + token_samples()]


@needs_gpu
def test_opcheck_on_cuda_tensors():
    assert native.load_cuda(), native.cuda_status()
    for op, args in _cuda_opcheck_samples():
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


# ---------------------------------------------------------------------------------------------
# engines and runners


class _Net(nn.Module):
    """Convolutions, group norm + SiLU folded into a gather, a residual, a skip concatenation."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = nn.Conv2d(32, 3, 3, padding=1)

    def forward(self, x):
        h = self.c1(x)
        y = self.c2(F.silu(self.norm(h))) + h
        return self.c3(torch.cat([y, h], dim=1))


def _engine(device="cpu", dtype=torch.float32, **options):
    torch.manual_seed(0)
    model = _Net().eval().to(device=device, dtype=dtype)
    x = torch.randn(1, 3, 32, 32, device=device, dtype=dtype)
    engine = sigec.compile(model, (x,), block_size=4, **options)
    engine(x)
    return model, engine, x


def _edit(x, top, left, size=6, value=1.0):
    y = x.clone()
    y[..., top:top + size, left:left + size] += value
    return y


class HostRecorder:
    """Stands in for CUDA graph capture on the CPU. Like a capture, it computes nothing on the
    real tensors: the outputs start as NaN (an uninitialized graph pool) and the caches are not
    touched. ``replay()`` recomputes the outputs from the static inputs, as a graph replay does."""

    def __init__(self, fail: bool = False):
        self.fail = fail

    def capture(self, fn, static_args):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        clones = [a.clone() if isinstance(a, torch.Tensor) else a for a in static_args]
        probe = fn(*clones)  # shapes only
        clone_storages = {c.untyped_storage().data_ptr(): s for c, s in zip(clones, static_args)
                          if isinstance(c, torch.Tensor)}
        outputs = []
        for o in probe:
            owner = clone_storages.get(o.untyped_storage().data_ptr()) if isinstance(o, torch.Tensor) else None
            if owner is not None:  # the graph returns one of its inputs (a cache updated in place)
                outputs.append(owner.as_strided(o.shape, o.stride(), o.storage_offset()))
            else:
                outputs.append(torch.full_like(o, float("nan")) if isinstance(o, torch.Tensor) else o)

        def replay():
            for out, result in zip(outputs, fn(*static_args)):
                if isinstance(out, torch.Tensor) and out.data_ptr() != result.data_ptr():
                    out.copy_(result)

        return replay, outputs


def _runner_sequence(engine, eager, x):
    """Edits that reuse block counts (replays), change them (captures), and a commit; each
    result is compared with the eager engine's."""
    edits = [_edit(x, 4, 4), _edit(x, 4, 4, value=-2.0), _edit(x, 20, 8), _edit(x, 4, 4, value=3.0)]
    for k, x_edit in enumerate(edits):
        got, want = engine(x_edit), eager(x_edit)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not got.isnan().any()
        if k == 2:
            engine.commit(), eager.commit()


def test_host_replay_equals_eager_engine():
    _, engine, x = _engine()
    _, eager, _ = _engine()
    cuda_graphs.set_runner(engine, "cuda-graphs", recorder=HostRecorder())
    _runner_sequence(engine, eager, x)
    runners = [p.incremental for p in engine.plans]
    assert all(isinstance(r, cuda_graphs.IncrementalRunner) for r in runners)
    assert sum(r.replays for r in runners) >= 2  # the repeated edits replayed ...
    assert sum(r.captures for r in runners) >= 2  # ... and a new block count captured again


def test_host_replay_reads_the_new_inputs_and_hands_out_copies():
    _, engine, x = _engine()
    cuda_graphs.set_runner(engine, "cuda-graphs", recorder=HostRecorder())
    first = engine(_edit(x, 4, 4))  # eager + capture
    second = engine(_edit(x, 4, 4, value=-1.0))  # same blocks, other values: replay
    kept = second.clone()
    third = engine(_edit(x, 4, 4, value=5.0))
    assert engine.incremental.replays == 2
    assert not torch.allclose(first, second) and not torch.allclose(second, third)
    assert torch.equal(second, kept)  # a later replay does not change an earlier result


def test_host_replay_evicts_the_least_recently_used_graph():
    _, engine, x = _engine(expected_active_fraction=0.05)
    cuda_graphs.set_runner(engine, "cuda-graphs", recorder=HostRecorder(), max_graphs=1)
    (runner,) = [p.incremental for p in engine.plans]
    small, large = _edit(x, 4, 4, size=5), _edit(x, 16, 4, size=10)  # different block counts
    for x_edit in (small, large, small, large):
        engine(x_edit)
    assert runner.captures == 4 and runner.replays == 0
    engine(large)
    assert runner.replays == 1


def test_captures_are_keyed_by_slot_plan_and_block_counts():
    _, engine, x = _engine(expected_active_fraction=0.05)
    with engine.slot("b"):
        engine(x)
    cuda_graphs.set_runner(engine, "cuda-graphs", recorder=HostRecorder())
    (runner,) = [p.incremental for p in engine.plans]
    engine(_edit(x, 4, 4))                     # default slot: eager, captured
    engine(_edit(x, 4, 4, value=-1.0))         # same slot, same blocks: replayed
    engine(_edit(x, 8, 8))                     # same slot, blocks moved by one block: replayed
    with engine.slot("b"):
        engine(_edit(x, 4, 4))                 # another slot, same block count: its own capture
        engine(_edit(x, 16, 4, size=10))       # more blocks: another capture
    assert (runner.captures, runner.replays) == (3, 2)
    default = next(key[1] for key, _ in engine.store.items() if key[1] != "b")
    report = engine.report()
    records = report.captures[0.05]
    assert [(r.slot, r.plan, r.replays) for r in records] == [(default, 0.05, 2), ("b", 0.05, 0), ("b", 0.05, 0)]
    small, large = records[1].block_counts, records[2].block_counts
    assert records[0].block_counts == small and sum(large) > sum(small) == records[1].active_blocks
    for r in records:
        assert r.capture_s > 0
        # static copies of the inputs and block indices, plus the graph's outputs other than the
        # caches it updates in place (here: none): never the caches, which the graph shares
        assert 0 < r.static_bytes <= r.memory_bytes < engine.store.nbytes()
    assert runner.capture_s == pytest.approx(sum(r.capture_s for r in records))
    assert "CUDA graphs, plan 5.0%: slot " in str(report) and "slot b, " in str(report)


def test_capture_memory_is_what_the_recorder_reports_holding():
    class Metered(HostRecorder):
        held = 0

        def capture(self, fn, static_args):
            Metered.held += 1000  # as a CUDA pool reserving a segment
            return super().capture(fn, static_args)

        def memory_in_use(self):
            return Metered.held

    _, engine, x = _engine(expected_active_fraction=0.05)
    cuda_graphs.set_runner(engine, "cuda-graphs", recorder=Metered())
    engine(_edit(x, 4, 4))
    (record,) = engine.incremental.capture_records()
    assert record.memory_bytes == 1000 + record.static_bytes and record.slot is None


def test_capture_failure_warns_once_and_runs_eagerly():
    _, engine, x = _engine()
    _, eager, _ = _engine()
    cuda_graphs.set_runner(engine, "cuda-graphs", recorder=HostRecorder(fail=True))
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        engine(_edit(x, 4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(engine(_edit(x, 4, 4, value=2.0)), eager(_edit(x, 4, 4, value=2.0)))
    assert engine.incremental.captures == 0 and engine.incremental.eager_calls == 2


def test_set_runner_validates_and_restores():
    _, engine, x = _engine()
    graphs = [p.incremental for p in engine.plans]
    with pytest.raises(ValueError, match="unknown runner"):
        cuda_graphs.set_runner(engine, "tensorrt")
    with pytest.raises(ValueError, match="weights are on cpu"):
        cuda_graphs.set_runner(engine, "cuda-graphs")
    cuda_graphs.set_runner(engine, "cuda-graphs", recorder=HostRecorder())
    assert engine.incremental.code == graphs[0].code  # reports and dumps read the same graph
    cuda_graphs.set_runner(engine, "eager")
    assert [p.incremental for p in engine.plans] == graphs


@pytest.mark.slow
def test_inductor_runner_equals_eager():
    _, engine, x = _engine(expected_active_fraction=0.05)
    _, eager, _ = _engine(expected_active_fraction=0.05)
    torch._dynamo.reset()
    cuda_graphs.set_runner(engine, "inductor")
    for x_edit in (_edit(x, 4, 4), _edit(x, 4, 4, value=-1.0)):
        torch.testing.assert_close(engine(x_edit), eager(x_edit), rtol=1e-4, atol=1e-5)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_engine_equals_reference_runtime_and_dense(dtype):
    assert native.load_cuda(), native.cuda_status()
    _, engine, x = _engine("cuda", dtype)
    engine.clear()
    recorded = engine(x)
    reference = ReferenceRuntime(engine.graph_module)
    reference.record([x])
    x_edit = _edit(x, 10, 12)
    got = engine(x_edit)
    want = reference.run([x_edit], engine.last_stats["input_mask"], engine.graph_module)[0]
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert torch.equal(engine(x), recorded)  # the unedited input: the recording, bit for bit


@needs_gpu
@pytest.mark.parametrize("runner", ["cuda-graphs", "inductor+cuda-graphs"])
def test_cuda_graph_replay_equals_eager(runner):
    assert native.load_cuda(), native.cuda_status()
    _, engine, x = _engine("cuda", torch.float16)
    _, eager, _ = _engine("cuda", torch.float16)
    torch._dynamo.reset()
    cuda_graphs.set_runner(engine, runner)
    _runner_sequence(engine, eager, x)
    runners = [p.incremental for p in engine.plans]
    assert sum(r.replays for r in runners) >= 2 and sum(r.captures for r in runners) >= 2


@needs_gpu
def test_cuda_graph_replay_does_not_synchronize():
    assert native.load_cuda(), native.cuda_status()
    _, engine, x = _engine("cuda", torch.float16)
    cuda_graphs.set_runner(engine, "cuda-graphs")
    engine(_edit(x, 4, 4))  # eager + capture
    plan = engine.plans[[p.incremental.captures for p in engine.plans].index(1)]
    calls = []
    original_fn = plan.incremental.forward
    plan.incremental.forward = lambda *a: calls.append(a) or original_fn(*a)
    engine(_edit(x, 4, 4, value=2.0))  # records the replayed call's arguments
    plan.incremental.forward = original_fn
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        plan.incremental(*calls[0])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert plan.incremental.replays == 2


@needs_gpu
def test_cuda_capture_records_hold_device_memory():
    assert native.load_cuda(), native.cuda_status()
    _, engine, x = _engine("cuda", torch.float16)
    cuda_graphs.set_runner(engine, "cuda-graphs")
    engine(_edit(x, 4, 4))  # eager + capture
    engine(_edit(x, 4, 4, value=2.0))  # replay
    records = [r for rs in engine.report().captures.values() for r in rs]
    assert len(records) == 1 and records[0].replays == 1
    assert records[0].capture_s > 0 and records[0].memory_bytes > records[0].static_bytes > 0


@needs_gpu
def test_graph_launch_count_is_a_lower_bound_of_the_profiled_kernels():
    from torch.profiler import ProfilerActivity, profile

    from sigec.core.launches import count_launches

    assert native.load_cuda(), native.cuda_status()
    _, engine, x = _engine("cuda", torch.float16)
    x_edit = _edit(x, 4, 4)
    engine(x_edit)
    plan = engine._plan
    calls = []
    graph = plan.incremental
    plan.incremental = lambda *a: calls.append(a) or graph(*a)
    engine(x_edit)
    plan.incremental = graph
    torch.cuda.synchronize()
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph(*calls[0])
        torch.cuda.synchronize()
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    assert count_launches(plan, calls[0]).launches <= kernels


# ---------------------------------------------------------------------------------------------
# benchmarks on CUDA


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
@pytest.mark.parametrize("argv,message", [
    (["--device", "cuda"], "torch sees no CUDA device"),
    (["--runner", "cuda-graphs"], "add --device cuda"),
])
def test_benchmark_refuses_cuda_without_a_gpu(argv, message, tmp_path, capsys):
    from benchmarks import church256

    with pytest.raises(SystemExit, match=message):
        church256.main(["--quick", "--no-timing", "--json", str(tmp_path / "r.json"), *argv])


@needs_gpu
@pytest.mark.parametrize("runner", ["eager", "cuda-graphs"])
def test_benchmark_quick_mode_on_cuda(runner, tmp_path):
    from benchmarks import church256

    result = church256.main(["--quick", "--device", "cuda", "--dtype", "fp16", "--runner", runner,
                             "--json", str(tmp_path / "r.json")])
    edit = result["rows"][0]
    assert result["device"] == "cuda" and result["dtype"] == "fp16"
    assert edit["psnr_db"] > 20 and edit["speedup"] > 0
