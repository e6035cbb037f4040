"""sigec.ir.costs: measuring kernel costs, caching them per machine, and using them in compile."""
import dataclasses
import json
import logging
import math

import pytest
import torch
import torch.nn as nn

import sigec
from sigec.ir import costs
from sigec.ir.costs import KernelCosts

GIVEN = KernelCosts(dense_mac=5e-12, dense_weight_byte=7e-11, sparse_mac=7e-12, sparse_weight_byte=6e-11,
                    element=5e-10, call=2e-5, source="given in a test")


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """An empty disk cache and an empty in-process memo; ``measure`` counted and instant."""
    monkeypatch.setenv("SIGEC_CACHE_DIR", str(tmp_path / "sigec"))
    monkeypatch.setattr(costs, "_memo", {})
    calls = []

    def fake_measure(device, dtype):
        calls.append((torch.device(device), dtype))
        return dataclasses.replace(GIVEN, source=f"measure #{len(calls)}")

    monkeypatch.setattr(costs, "measure", fake_measure)
    return tmp_path / "sigec" / "kernel-costs.json", calls


def test_measure_gives_plausible_positive_figures():
    measured = costs.measure()
    for field in ("dense_mac", "dense_weight_byte", "sparse_mac", "sparse_weight_byte", "element", "call"):
        value = getattr(measured, field)
        assert math.isfinite(value) and value > 0, field
    # any CPU from the last decade: 1 ps to 1 ns per MAC, under a millisecond per call
    assert 1e-13 < measured.dense_mac < 1e-9 and 1e-13 < measured.sparse_mac < 1e-9
    assert measured.call < 1e-3
    assert f"{torch.get_num_threads()} threads" in measured.source
    assert "ps/MAC" in measured.summary()


def test_costs_are_measured_once_then_read_from_disk(cache_home):
    path, calls = cache_home
    first = costs.machine_costs("cpu", torch.float32)
    assert len(calls) == 1 and path.is_file()
    assert costs.machine_costs("cpu", torch.float32) is first  # memo
    costs._memo.clear()
    assert costs.machine_costs("cpu", torch.float32) == first and len(calls) == 1  # disk
    costs.machine_costs("cpu", torch.float64)  # another dtype is another entry
    assert len(calls) == 2 and len(json.loads(path.read_text())) == 2
    again = costs.machine_costs("cpu", torch.float32, remeasure=True)
    assert len(calls) == 3 and again.source == "measure #3"
    costs._memo.clear()
    assert costs.machine_costs("cpu", torch.float32).source == "measure #3"  # replaced on disk


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"KEY": {"dense_mac": -1}}'])
def test_a_damaged_cache_is_measured_again_with_a_warning(cache_home, caplog, content):
    path, calls = cache_home
    path.parent.mkdir(parents=True)
    key = costs._key(torch.device("cpu"), torch.float32)
    path.write_text(content.replace("KEY", key.replace('"', '\\"')))
    with caplog.at_level(logging.WARNING, logger="sigec.ir.costs"):
        got = costs.machine_costs("cpu", torch.float32)
    assert len(calls) == 1 and got.source == "measure #1"
    assert "kernel-cost cache" in caplog.text and "measuring again" in caplog.text
    assert key in json.loads(path.read_text())  # repaired


def test_an_unwritable_cache_still_returns_costs(cache_home, caplog, monkeypatch):
    path, calls = cache_home
    path.parent.parent.mkdir(parents=True, exist_ok=True)
    path.parent.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="sigec.ir.costs"):
        got = costs.machine_costs("cpu", torch.float32)
    assert got.source == "measure #1" and "could not cache the kernel costs" in caplog.text


def test_bad_costs_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="KernelCosts.call must be a positive"):
        KernelCosts(dense_mac=1e-12, dense_weight_byte=1e-11, sparse_mac=1e-12, sparse_weight_byte=1e-11,
                    element=1e-10, call=0.0)
    with pytest.raises(TypeError, match="kernel_costs must be a sigec.ir.costs.KernelCosts"):
        sigec.compile(nn.Conv2d(2, 2, 3, padding=1).eval(), torch.randn(1, 2, 8, 8), kernel_costs={"call": 1e-5})


def test_compile_prices_with_the_given_costs_and_reports_them():
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)).eval()
    x = torch.randn(1, 3, 64, 64)
    engine = sigec.compile(model, x, kernel_costs=GIVEN, expected_active_fraction=0.02)
    engine(x)
    edited = x.clone()
    edited[:, :, 30:34, 30:34] += 1
    engine(edited)
    text = str(engine.report())
    assert "kernel costs: dense conv 5.00 ps/MAC" in text and "(given in a test)" in text
    reasons = [n.reason for n in engine.report().nodes if n.op.startswith("aten.conv2d")]
    assert reasons and all(" ms vs dense " in r for r in reasons)
