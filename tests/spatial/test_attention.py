"""Token-sparse attention end to end: the engine against the reference runtime and the dense model."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sigec
from sigec.runtime.reference import ReferenceRuntime
from tests.attention_nets import HandWrittenNet, TransformerNet

CONTEXT_TOKENS = 5


def _mask(h, w, box):
    m = torch.zeros(h, w, dtype=torch.bool)
    top, left, bh, bw = box
    m[top:top + bh, left:left + bw] = True
    return m


def _compile(model, args, **options):
    torch.manual_seed(0)
    return sigec.compile(model.eval(), args, block_size=4, expected_active_fraction=0.05, **options)


CASES = {
    "transformer": lambda b: (TransformerNet(), (torch.randn(b, 3, 16, 16), torch.randn(b, CONTEXT_TOKENS, 8))),
    "hand-written": lambda b: (HandWrittenNet(), (torch.randn(b, 3, 16, 16),)),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("policy", ["sige", "exact"])
def test_engine_equals_reference_runtime(name, policy):
    torch.manual_seed(1)
    model, args = CASES[name](2)
    engine = _compile(model, args, policy=policy)
    reference = ReferenceRuntime(engine.plans[0].graph_module)
    with torch.no_grad():
        engine(*args)
        reference.record(list(args))
        for box in [(2, 3, 3, 4), (8, 0, 6, 9), (0, 0, 1, 1)]:
            mask = _mask(16, 16, box)
            edited = (args[0] + mask * torch.randn_like(args[0]),) + args[1:]
            out = engine(*edited, mask=mask)
            expected = reference.run(list(edited), mask, gm=engine.graph_module)[0]
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    ops = {n.target for n in engine.incremental.graph.nodes if n.op == "call_function"}
    assert torch.ops.sigec.attention_blocks.default in ops, "attention did not run on the active queries"


@pytest.mark.parametrize("name", sorted(CASES))
def test_full_mask_under_exact_is_the_dense_model(name):
    torch.manual_seed(2)
    model, args = CASES[name](1)
    for module in model.modules():  # group norms keep frozen statistics, by design: take them out
        for child, sub in list(module.named_children()):
            if isinstance(sub, torch.nn.GroupNorm):
                setattr(module, child, torch.nn.Identity())
    engine = _compile(model, args, policy="exact")
    with torch.no_grad():
        engine(*args)
        edited = (args[0] + torch.randn_like(args[0]),) + args[1:]
        out = engine(*edited, mask=torch.ones(16, 16, dtype=torch.bool))
        torch.testing.assert_close(out, model(*edited), rtol=1e-4, atol=1e-5)


def test_empty_edit_returns_the_recorded_output_bit_for_bit():
    model, args = CASES["transformer"](1)
    engine = _compile(model, args)
    with torch.no_grad():
        recorded = engine(*args)
        assert torch.equal(engine(*args, mask=torch.zeros(16, 16, dtype=torch.bool)), recorded)


class _ContextMatmuls(TorchDispatchMode):
    """Counts the matrix products that read a context-length operand (the cross-attention K/V)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm,
                                    torch.ops.aten.linear, torch.ops.aten.matmul):
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            if any(len(s) >= 2 and CONTEXT_TOKENS in s[:-1] for s in shapes):
                self.count += 1
        return func(*args, **(kwargs or {}))


def test_cross_attention_keys_and_values_are_computed_once_per_slot():
    torch.manual_seed(3)
    model, (x, context) = CASES["transformer"](1)
    engine = _compile(model, (x, context))
    mask = _mask(16, 16, (4, 4, 4, 4))
    with torch.no_grad():
        with _ContextMatmuls() as record:
            engine(x, context)
        assert record.count == 2  # to_k and to_v of the cross-attention, while recording the slot
        for _ in range(3):
            with _ContextMatmuls() as edit:
                engine(x + mask * torch.randn_like(x), context, mask=mask)
            assert edit.count == 0, "an edit recomputed the cross-attention keys or values"
        other = torch.randn_like(context)
        with _ContextMatmuls() as new_slot:
            out = engine(x, other)  # another context is another slot: recorded, with its own K/V
        assert new_slot.count == 2 and len(engine.store) == 2
        torch.testing.assert_close(out, model(x, other), rtol=1e-5, atol=1e-5)
