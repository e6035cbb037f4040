"""``torch.compile(backend="sigec")``: one IR with ``sigec.compile``, no graph breaks, safe fallback."""
import warnings

import pytest
import torch
import torch.nn as nn

import sigec
from sigec.models import autoencoder_kl, ddpm_unet


@pytest.fixture(scope="module")
def unet():
    return ddpm_unet("church-small")


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 64, 64, generator=g)
    x_edit = x.clone()
    x_edit[:, :, 12:24, 30:44] = torch.randn(1, 3, 12, 14, generator=g)
    return x, x_edit, torch.tensor([10])


def test_backend_equals_sigec_compile(unet, inputs):
    x, x_edit, t = inputs
    torch._dynamo.reset()
    compiled = torch.compile(unet, backend="sigec", options={"policy": "sige", "dilation": 1})
    recorded = compiled(x, t).sample
    torch.testing.assert_close(recorded, unet(x, t).sample)
    incremental = compiled(x_edit, t).sample
    engine = sigec.compile(unet, (x, t), policy="sige", dilation=1)
    engine(x, t)
    assert torch.equal(incremental, engine(x_edit, t).sample)
    assert not torch.equal(incremental, unet(x_edit, t).sample)  # it really ran incrementally


def test_no_graph_breaks(unet, inputs):
    x, _, t = inputs
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(unet)(x, t)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_vae_decoder_one_graph_and_equal_to_sigec_compile():
    vae = autoencoder_kl((16, 32), norm_num_groups=8)
    z = torch.randn(1, 4, 16, 16)
    z_edit = z.clone()
    z_edit[:, :, 3:7, 4:9] += 1
    torch._dynamo.reset()
    assert torch._dynamo.explain(vae.decoder)(z).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(vae.decoder, backend="sigec")
    compiled(z)
    engine = sigec.compile(vae.decoder, (z,))
    engine(z)
    assert torch.equal(compiled(z_edit), engine(z_edit))


def test_inside_a_compiled_sampling_step(unet, inputs):
    x, x_edit, t = inputs
    torch._dynamo.reset()

    def step(sample, timestep):
        return sample - 0.1 * unet(sample, timestep).sample

    explanation = torch._dynamo.explain(step)(x, t)
    assert explanation.graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(step, backend=sigec.backend(policy="exact", block_size=8), fullgraph=True)
    torch.testing.assert_close(compiled(x, t), step(x, t))
    engine = sigec.compile(unet, (x, t), policy="exact", block_size=8)
    engine(x, t)
    expected = x_edit - 0.1 * engine(x_edit, t).sample
    torch.testing.assert_close(compiled(x_edit, t), expected, rtol=1e-5, atol=1e-5)


def test_pipeline_failure_falls_back_with_one_warning():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU()).eval()  # no image input: sigec cannot apply
    x = torch.randn(2, 3)
    compiled = torch.compile(model, backend="sigec")
    with pytest.warns(UserWarning, match="running this graph unchanged.*no image input"):
        out = compiled(x)
    torch.testing.assert_close(out, model(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(compiled(x * 2), model(x * 2))  # warned once, at compile time


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['fast'\]; valid options are"):
        sigec.backend(fast=True)


def test_entry_point_is_registered():
    from torch._dynamo import list_backends

    assert "sigec" in list_backends(exclude_tags=())
