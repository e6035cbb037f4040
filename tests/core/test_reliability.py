"""Never a stale or wrong result: weight changes, NaN inputs, faults part-way, threads, refusals."""
import threading

import pytest
import torch
import torch.nn as nn
from torch.fx import Interpreter

import sigec
from sigec import CaptureError, EngineError
from sigec.runtime import ReferenceRuntime


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(),
                         nn.Conv2d(8, 3, 3, padding=1)).eval()


def _edit(x, value=1.0):
    out = x.clone()
    out[..., 3:7, 5:9] += value
    return out


def test_in_place_weight_change_records_again():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1)).eval()
    x = torch.randn(1, 3, 16, 16)
    engine = sigec.compile(model, (x,), policy="exact", block_size=4)
    engine(x)
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    x2 = _edit(x)
    torch.testing.assert_close(engine(x2), model(x2))  # stale slot dropped: this call recorded
    assert engine.last_stats is None or len(engine.store) == 1
    x3 = _edit(x2, 2.0)
    torch.testing.assert_close(engine(x3), model(x3), rtol=1e-4, atol=1e-5)  # incremental again


def test_in_place_weight_change_can_raise():
    model, x = _model(), torch.randn(1, 3, 16, 16)
    engine = sigec.compile(model, (x,), on_stale="raise")
    engine(x)
    with torch.no_grad():
        model[3].bias.add_(1)
    with pytest.raises(EngineError, match="weights changed since slot"):
        engine(_edit(x))


def test_replaced_parameter_needs_a_new_compile():
    model, x = _model(), torch.randn(1, 3, 16, 16)
    engine = sigec.compile(model, (x,))
    engine(x)
    model[0].weight = nn.Parameter(model[0].weight.detach() * 2)
    with pytest.raises(EngineError, match="replaced by a new tensor"):
        engine(x)


def test_nan_and_inf_inputs_count_as_edits():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1)).eval()
    x = torch.randn(1, 3, 16, 16)
    engine = sigec.compile(model, (x,), policy="exact", block_size=4)
    engine(x)
    for bad in (float("nan"), float("inf")):
        x2 = x.clone()
        x2[0, 1, 9, 9] = bad
        out = engine(x2)
        assert engine.last_stats["input_mask"][9, 9]
        torch.testing.assert_close(out, model(x2), equal_nan=True)


class _FaultAt(nn.Module):
    """Runs a GraphModule and raises at its ``k``-th call_function node."""

    def __init__(self, gm, k):
        super().__init__()
        self.gm, self.k = gm, k

    def forward(self, *args):
        k = self.k

        class Faulty(Interpreter):
            seen = 0

            def call_function(self, target, a, kw):
                if Faulty.seen == k:
                    raise RuntimeError(f"injected fault at node {k}")
                Faulty.seen += 1
                return super().call_function(target, a, kw)

        return Faulty(self.gm).run(*args)


def test_fault_at_every_runtime_op_leaves_the_engine_correct():
    model, x = _model(), torch.randn(1, 3, 16, 16)
    engine = sigec.compile(model, (x,), block_size=4, expected_active_fraction=0.05)
    reference = ReferenceRuntime(engine.graph_module)
    engine(x)
    reference.record([x])
    (plan,) = engine.plans
    healthy = plan.incremental
    n_ops = sum(1 for n in healthy.graph.nodes if n.op == "call_function")
    x2 = _edit(x)
    for k in range(n_ops):
        plan.incremental = _FaultAt(healthy, k)
        with pytest.raises(RuntimeError, match="injected fault"):
            engine(x2)
        plan.incremental = healthy
        x3 = _edit(x, 0.5 + k)
        torch.testing.assert_close(engine(x3), reference.run([x3], engine.last_stats["input_mask"], engine.graph_module)[0],
                                   rtol=1e-4, atol=1e-4)
    engine.commit()  # the last good edit is still pending and commits cleanly


def test_two_threads_get_serial_results():
    model, x = _model(), torch.randn(1, 3, 16, 16)
    engine = sigec.compile(model, (x,), block_size=4)
    engine(x)
    edits = [_edit(x, v) for v in (0.5, 1.0, 1.5, 2.0)]
    expected = [engine(e) for e in edits]
    results: dict = {}

    def worker(i):
        for _ in range(5):
            results.setdefault(i, []).append(engine(edits[i]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(edits))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, outs in results.items():
        for out in outs:
            assert torch.equal(out, expected[i])


def test_training_mode_is_refused():
    with pytest.raises(ValueError, match="training mode"):
        sigec.compile(nn.Conv2d(3, 3, 1), (torch.randn(1, 3, 8, 8),))


def test_model_that_mutates_its_buffers_is_refused():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))
            self.conv = nn.Conv2d(1, 1, 1)

        def forward(self, x):
            self.calls.add_(1)
            return self.conv(x)

    with pytest.raises(CaptureError, match=r"(?s)changes a tensor in place \(aten.add_.Tensor.*self.calls.add_\(1\)"):
        sigec.compile(Counter().eval(), (torch.randn(1, 1, 8, 8),))


def test_per_sample_masks_are_unioned_into_one_batched_call():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1)).eval()
    x = torch.randn(2, 3, 16, 16)
    engine = sigec.compile(model, (x,), policy="exact", block_size=4)
    engine(x)
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, 1:4, 1:4] = True
    masks[1, 10:13, 9:12] = True
    x2 = torch.where(masks[:, None], x + 1, x)
    torch.testing.assert_close(engine(x2, mask=masks), model(x2), rtol=1e-4, atol=1e-5)
    assert engine.last_stats["input_mask"].sum() == 18
    with pytest.raises(EngineError, match="N x H x W"):
        engine(x2, mask=torch.zeros(3, 16, 16, dtype=torch.bool))


def test_moving_an_engine_is_refused_before_anything_changes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1)).eval()
    x = torch.randn(1, 3, 16, 16)
    engine = sigec.compile(model, (x,), policy="exact", block_size=4)
    recorded = engine(x)
    for move in (lambda: engine.to(torch.float64), lambda: engine.half(), lambda: engine.to("meta")):
        with pytest.raises(EngineError, match="cannot move from torch.float32 on cpu"):
            move()
    assert model[0].weight.dtype == torch.float32 and len(engine.store) == 1
    assert torch.equal(engine(x), recorded)
    engine.to("cpu")  # no move: allowed


def test_model_moved_after_compile_is_detected():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)).eval()
    x = torch.randn(1, 3, 16, 16)
    engine = sigec.compile(model, (x,))
    engine(x)
    model.double()
    with pytest.raises(EngineError, match="the model was moved after compile"):
        engine(x.double())


def test_block_sizes_at_the_extremes():
    model = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.Upsample(scale_factor=2.0), nn.Conv2d(4, 3, 3, padding=1)).eval()
    x = torch.randn(1, 3, 12, 12)
    for block in (1, 1000):
        engine = sigec.compile(model, (x,), policy="exact", block_size=block, expected_active_fraction=0.01)
        engine(x)
        x2 = x.clone()
        x2[..., 5, 5] += 1
        torch.testing.assert_close(engine(x2), model(x2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("policy", ["sige", "exact"])
def test_cache_in_a_narrower_storage_dtype(policy):
    model = _model()
    x = torch.randn(1, 3, 16, 16)
    wide = sigec.compile(model, (x,), policy=policy, block_size=4)
    narrow = sigec.compile(model, (x,), policy=policy, block_size=4, cache_dtype=torch.bfloat16)
    recorded = narrow(x)
    wide(x)
    assert narrow.store.nbytes() < 0.8 * wide.store.nbytes()
    assert torch.equal(narrow(x), recorded)  # unedited: the recorded output, bit for bit
    x2 = _edit(x)
    out = narrow(x2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, wide(x2), rtol=2e-2, atol=2e-2)
    narrow.commit()
    assert all(c.dtype in (torch.bfloat16, torch.float32) for c in narrow.store.get(narrow.store.keys()[0]).caches)


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_a_narrower_cache_is_written_in_place(stored):
    """Caches in ``cache_dtype`` are working buffers: edits write their blocks into them (no widened
    copy is returned), successive edits each match the fp32-cache engine, and the unedited input
    still returns the recording bit for bit."""
    model = _model()
    x = torch.randn(1, 3, 16, 16)
    wide = sigec.compile(model, (x,), policy="exact", block_size=4)
    narrow = sigec.compile(model, (x,), policy="exact", block_size=4, cache_dtype=stored)
    recorded, _ = narrow(x), wide(x)
    sig = narrow.signature
    written = {sig.caches[c] for c, _, _ in sig.inplace}
    assert written and written <= set(sig.stored)  # every in-place cache is stored narrow...
    assert not {name for name, _ in written} & set(sig.updated)  # ...and none returns a widened copy
    elsewhere = x.clone()
    elsewhere[..., 10:14, 0:4] -= 1.0
    for edited in (_edit(x), elsewhere, _edit(x, 2.0)):
        torch.testing.assert_close(narrow(edited), wide(edited), rtol=2e-2, atol=2e-2)
    assert torch.equal(narrow(x), recorded)
    slot = narrow.store.get(narrow.store.keys()[0])
    assert {slot.caches[narrow.cache_keys.index(key)].dtype for key in sig.stored} == {stored}


class _SkipCat(nn.Module):
    """A skip concatenation of two edited maps and a learned constant map (``gather_cat`` over
    sources that are stored narrow, or narrow and not)."""

    def __init__(self, constant_part: bool):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.constant = nn.Parameter(torch.randn(1, 2, 16, 16)) if constant_part else None
        self.out = nn.Conv2d(8 + (2 if constant_part else 0), 3, 3, padding=1)

    def forward(self, x):
        h = self.a(x)
        parts = [h, torch.sigmoid(h)] + ([self.constant.expand(x.shape[0], -1, -1, -1)] if self.constant is not None else [])
        return self.out(torch.cat(parts, dim=1))


@pytest.mark.parametrize("constant_part", [False, True])
def test_a_narrower_cache_under_a_skip_concatenation(constant_part):
    model = _SkipCat(constant_part).eval()
    x = torch.randn(1, 3, 16, 16)
    options = dict(policy="exact", block_size=4)  # conftest's work-proportional costs: sparse ops
    wide = sigec.compile(model, (x,), **options)
    narrow = sigec.compile(model, (x,), cache_dtype=torch.float16, **options)
    narrow(x), wide(x)
    # the concatenation is read by gather_cat: over the fp16 caches themselves, or (next to the
    # fp32 constant, as gather_cat's sources share one dtype) over widened copies of them
    cats = [n for n in narrow.incremental.graph.nodes if n.target == torch.ops.sigec.gather_cat.default]
    assert cats and narrow.signature.stored
    sources = {s.op if s.op == "placeholder" else s.target for s in cats[0].args[0]}
    widened_and_constant = {torch.ops.aten._to_copy.default, torch.ops.aten.expand.default}
    assert sources == (widened_and_constant if constant_part else {"placeholder"})
    for edited in (_edit(x), _edit(x, -2.0)):
        torch.testing.assert_close(narrow(edited), wide(edited), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(wide(edited), model(edited), rtol=1e-4, atol=1e-5)


def test_wrong_devices_are_named():
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1)).eval()
    x = torch.randn(1, 3, 8, 8)
    engine = sigec.compile(model, (x,))
    engine(x)
    with pytest.raises(EngineError, match="is on meta but the engine's weights are on cpu"):
        engine(x.to("meta"))
    with pytest.raises(EngineError, match="mask is on meta but the inputs are on cpu"):
        engine(x, mask=torch.ones(8, 8, dtype=torch.bool, device="meta"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_compute_in_their_dtype(dtype):
    model = _model().to(dtype)
    x = torch.randn(1, 3, 16, 16, dtype=dtype)
    engine = sigec.compile(model, (x,), block_size=4)
    reference = ReferenceRuntime(engine.graph_module)
    assert torch.equal(engine(x), reference.record([x])[0])
    x2 = _edit(x)
    out = engine(x2)
    assert out.dtype == dtype
    torch.testing.assert_close(out, reference.run([x2], engine.last_stats["input_mask"], engine.graph_module)[0], rtol=2e-2, atol=2e-2)


def test_named_slot_that_was_never_recorded():
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1)).eval()
    x = torch.randn(1, 3, 8, 8)
    engine = sigec.compile(model, (x,))
    engine(x)
    with engine.slot("never-recorded"), pytest.raises(EngineError, match="no recorded run for slot 'never-recorded'"):
        engine(x, mask=torch.ones(8, 8, dtype=torch.bool))
