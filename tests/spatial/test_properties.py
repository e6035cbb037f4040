"""Property tests over random conv nets and random masks (DESIGN.md section 6).

* ``exact`` equals the dense model on the edited input (fp32, 1e-4 relative);
* the incremental graph equals the reference interpreter, under both policies;
* an all-false mask returns the recorded output bit for bit.
"""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sigec
from sigec.runtime import ReferenceRuntime
from tests.random_nets import random_masks, random_nets

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


def _edit(x: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=g)
    return torch.where(mask[None, None], x + noise, x)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().clamp_min(1.0)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * float(scale))


@SETTINGS
@given(data=st.data(), net=random_nets(), block=st.sampled_from([None, 2, 3, 4, 8]))
def test_exact_equals_dense_and_reference(data, net, block):
    model, x = net
    size = x.shape[-1]
    engine = sigec.compile(model, (x,), policy="exact", block_size=block)
    reference = ReferenceRuntime(engine.graph_module)
    recorded = engine(x)
    reference.record([x])
    mask = data.draw(random_masks(size))
    x_edit = _edit(x, mask, data.draw(st.integers(0, 1000)))
    out = engine(x_edit)
    if not mask.any():
        assert torch.equal(out, recorded)
        return
    with torch.no_grad():
        _close(out, model(x_edit))
        _close(out, reference.run([x_edit], engine.last_stats["input_mask"], engine.graph_module)[0])


@SETTINGS
@given(data=st.data(), net=random_nets(), block=st.sampled_from([None, 2, 4]),
       dilation=st.integers(0, 2))
def test_sige_equals_reference_with_explicit_mask(data, net, block, dilation):
    model, x = net
    size = x.shape[-1]
    engine = sigec.compile(model, (x,), policy="sige", block_size=block, dilation=dilation)
    reference = ReferenceRuntime(engine.graph_module)
    recorded = engine(x)
    reference.record([x])
    mask = data.draw(random_masks(size))
    x_edit = _edit(x, mask, 7)
    out = engine(x_edit, mask=mask)
    if not mask.any():
        assert torch.equal(out, recorded)
        return
    _close(out, reference.run([x_edit], mask, engine.graph_module)[0])


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(net=random_nets(), policy=st.sampled_from(["sige", "exact"]))
def test_empty_mask_returns_recording_bit_for_bit(net, policy):
    model, x = net
    engine = sigec.compile(model, (x,), policy=policy)
    recorded = engine(x)
    assert torch.equal(engine(x.clone()), recorded)
    empty = torch.zeros(x.shape[-2:], dtype=torch.bool)
    assert torch.equal(engine(x + 1, mask=empty), recorded)
