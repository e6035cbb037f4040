"""Edits that a dense run serves better: a mask over the whole input is the dense model (normalization
statistics recomputed), and an edit the cost model prices above dense runs dense."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import sigec
from sigec.models import sd_unet


class GroupNormNet(nn.Module):
    """Global statistics: an incremental run keeps the recorded ones, a dense run does not."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.out = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x):
        return self.out(F.silu(self.norm(self.conv(x))))


class ConvStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Conv2d(16, 16, 3, padding=1) for _ in range(4)])

    def forward(self, x):
        return self.layers(x)


def test_full_mask_is_dense_under_every_policy():
    torch.manual_seed(0)
    model = GroupNormNet().eval()
    x = torch.randn(1, 3, 32, 32)
    edited = x + torch.randn_like(x)  # the whole image changes: the statistics change
    with torch.no_grad():
        dense = model(edited)
    for policy in ("sige", "exact"):
        engine = sigec.compile(model, (x,), policy=policy)
        engine(x)
        torch.testing.assert_close(engine(edited), dense, rtol=1e-5, atol=1e-5)  # mask from the difference
        assert engine.last_stats["dense"]
        full = torch.ones(32, 32, dtype=torch.bool)
        torch.testing.assert_close(engine(edited, mask=full), dense, rtol=1e-5, atol=1e-5)
        # committed, the dense run is the new baseline: editing it back to x gives the original
        engine.commit()
        torch.testing.assert_close(engine(edited), dense, rtol=1e-5, atol=1e-5)
        assert not engine.last_stats["input_mask"].any()  # nothing differs from the new baseline
        torch.testing.assert_close(engine(x, mask=full), model(x).detach(), rtol=1e-5, atol=1e-5)


def test_sd_unet_with_group_norms_full_mask_equals_dense():
    unet = sd_unet("sd-tiny")
    x, t, text = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    edited = x + 0.5 * torch.randn_like(x)
    with torch.no_grad():
        dense = unet(edited, t, encoder_hidden_states=text).sample
    engine = sigec.compile(unet, (x, t), {"encoder_hidden_states": text}, policy="exact",
                           expected_active_fraction=0.05)
    engine(x, t, encoder_hidden_states=text)
    out = engine(edited, t, encoder_hidden_states=text, mask=torch.ones(16, 16, dtype=torch.bool)).sample
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_an_edit_priced_above_dense_runs_dense():
    torch.manual_seed(0)
    model = ConvStack().eval()
    x = torch.randn(1, 16, 64, 64)
    engine = sigec.compile(model, (x,), policy="exact", expected_active_fraction=0.01)
    assert engine._priced[id(engine.plans[0])], "the small-edit plan runs its convolutions sparse"
    engine(x)
    small, large = torch.zeros(64, 64, dtype=torch.bool), torch.ones(64, 64, dtype=torch.bool)
    small[30:33, 30:33] = True
    large[:2] = False  # 97% of the image, not all of it
    for mask, dense_run in ((small, False), (large, True)):
        edited = x + mask.float()
        out = engine(edited, mask=mask)
        assert bool(engine.last_stats.get("dense")) is dense_run
        torch.testing.assert_close(out, model(edited).detach(), rtol=1e-5, atol=1e-5)
