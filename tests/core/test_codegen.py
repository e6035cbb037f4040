"""The emitted GraphModules are ordinary: printable, re-exportable, compilable without breaks."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import sigec
from sigec.passes.verifier import verify_incremental


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        return self.c2(F.silu(self.norm(self.c1(x)))) + x


def _engine_and_inputs():
    torch.manual_seed(0)
    model = Small().eval()
    x = torch.randn(1, 3, 16, 16)
    engine = sigec.compile(model, (x,), block_size=4, expected_active_fraction=0.05)
    engine(x)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[3:7, 8:12] = True
    x2 = torch.where(mask, x + 1, x)
    out = engine(x2, mask=mask)
    stats = engine.last_stats
    slot = engine.store.get(engine.store.keys()[0])
    inputs = [x2, *slot.caches, *[stats["blocks"][k] for k in engine.signature.blocks],
              *[stats["masks"][m][None, None] for m in engine.signature.pixel_masks]]
    return engine, inputs, out


def test_graphs_are_printable_and_use_sigec_ops():
    engine, _, _ = _engine_and_inputs()
    code = engine.incremental.code
    assert "torch.ops.sigec.gather" in code and "torch.ops.sigec.scatter" in code
    assert "silu" in code  # the activation folded into the gather is named in its arguments
    assert "torch.ops.sigec.norm_affine" in engine.recording.code
    verify_incremental(engine.incremental)
    assert engine.incremental.print_readable(print_output=False)


def test_incremental_graph_reexports():
    engine, inputs, out = _engine_and_inputs()
    ep = torch.export.export(engine.incremental, tuple(inputs), strict=False)
    torch.testing.assert_close(ep.module()(*inputs)[0], out)


def test_graphs_run_under_torch_compile_fullgraph():
    engine, inputs, out = _engine_and_inputs()
    torch._dynamo.reset()
    compiled = torch.compile(engine.incremental, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs)[0], out)
        recorded = torch.compile(engine.recording, fullgraph=True, backend="aot_eager")(inputs[0])
    assert len(recorded) == engine.signature.num_outputs + len(engine.signature.caches)


def test_incremental_graph_under_inductor():
    engine, inputs, out = _engine_and_inputs()
    torch._dynamo.reset()
    compiled = torch.compile(engine.incremental, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs)[0], out, rtol=1e-4, atol=1e-5)
