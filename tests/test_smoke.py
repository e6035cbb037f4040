import torch
import torch.nn as nn

import sigec


def test_compile_and_edit_matches_dense_under_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1)).eval()
    x = torch.randn(1, 3, 16, 16)
    engine = sigec.compile(model, (x,), policy="exact", block_size=4)
    engine(x)
    x2 = x.clone()
    x2[:, :, 5:7, 5:7] += 1
    torch.testing.assert_close(engine(x2), model(x2), rtol=1e-4, atol=1e-5)
