"""The reference interpreter stands apart from codegen: check it against first principles."""
import torch
import torch.nn as nn

import sigec
from sigec.runtime import ReferenceRuntime


def test_reference_exact_equals_dense_and_keeps_recorded_values_outside():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1)).eval()
    x = torch.randn(1, 3, 16, 16)
    engine = sigec.compile(model, (x,), policy="exact", block_size=4)
    ref = ReferenceRuntime(engine.graph_module)
    recorded = ref.record([x])[0]
    torch.testing.assert_close(recorded, model(x))
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[0:2, 0:2] = True
    x2 = torch.where(mask, x + 3, x)
    out = ref.run([x2], mask)[0]
    torch.testing.assert_close(out, model(x2), rtol=1e-5, atol=1e-6)
    # two 3x3 convs reach 2 pixels; blocks of 4 keep everything past row/col 4 recorded
    assert torch.equal(out[..., 8:, :], recorded[..., 8:, :])


def test_reference_sige_freezes_outside_the_resolution_mask():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 5, padding=2), nn.Conv2d(3, 3, 5, padding=2)).eval()
    x = torch.randn(1, 3, 16, 16)
    engine = sigec.compile(model, (x,), policy="sige", block_size=4, dilation=0)
    ref = ReferenceRuntime(engine.graph_module)
    recorded = ref.record([x])[0]
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[5:7, 5:7] = True
    out = ref.run([torch.where(mask, x + 1, x)], mask)[0]
    changed = (out != recorded).any(dim=1)[0]
    assert changed[4:8, 4:8].any() and not changed[:4].any() and not changed[8:].any()
