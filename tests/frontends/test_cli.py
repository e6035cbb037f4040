import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

import sigec
from sigec.frontends import demo
from sigec.frontends.cli import main
from sigec.models import available_models


def test_version_flag(capsys):
    # argparse's version action exits; accept a plain return too
    try:
        code = main(["--version"])
    except SystemExit as exc:
        code = exc.code
    assert code in (0, None)
    assert f"sigec {sigec.__version__}" in capsys.readouterr().out


def test_version_via_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "sigec.frontends.cli", "--version"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"sigec {sigec.__version__}"


def test_no_subcommand_prints_help_and_returns_2(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert "usage: sigec" in captured.err
    assert captured.out == ""


def test_help_lists_demo(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_library_errors_exit_1(monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise sigec.EngineError("bad engine")

    monkeypatch.setattr(demo, "run_demo", boom)
    assert main(["demo", "--out", "unused.png"]) == 1
    assert "sigec: error: bad engine" in capsys.readouterr().err


def test_invalid_edit_fraction_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--edit-fraction", "0"])
    assert exc.value.code == 2


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.3, 1.0])
def test_ellipse_mask_covers_requested_fraction(fraction):
    mask = demo.ellipse_mask(64, fraction)
    assert mask.shape == (64, 64) and mask.dtype == torch.bool
    assert abs(float(mask.float().mean()) - fraction) < 0.01


def test_digits_demo_end_to_end(tmp_path, capsys):
    """The digits demo: SDEdit of a sampled "1" with the shipped digits model."""
    out = tmp_path / "demo.png"
    results = demo.run_demo(out, model="digits-ddpm", repeats=1, threads=1)
    assert out.is_file()
    with Image.open(out) as img:
        assert img.format == "PNG"
        assert img.size == results["image_size"]
        # five 256-px panels side by side, plus padding and a label strip
        assert 5 * 256 <= img.width < 5 * 256 + 100
        assert 256 <= img.height < 256 + 60
    assert results["model"] == "digits-ddpm" and results["label"] == 1   # the default seed samples a 1
    images = results["images"]
    mask = images["mask"]
    assert abs(results["edited_fraction"] - float(mask.float().mean())) < 1e-9
    assert 0.1 < results["edited_fraction"] < 0.2
    # the edit paints ink only inside its mask, and SDEdit changed the picture there
    assert torch.equal(images["edited"][0, 0][~mask], images["original"][0, 0][~mask])
    assert not torch.equal(images["dense"], images["unedited"])
    # the incremental result is the dense one, approximately, and much closer than doing nothing
    assert results["psnr_db"] > 20 and results["psnr_db"] > results["psnr_unedited_db"] + 3
    assert results["steps"] == 25 and 0 < results["incremental_macs"] < results["dense_macs"]
    for key in ("dense_ms", "incremental_ms", "speedup"):
        assert results[key] > 0
    printed = capsys.readouterr().out
    assert "PSNR" in printed and str(out) in printed and "digits-ddpm" in printed


def test_cli_demo_writes_png(tmp_path, capsys):
    out = tmp_path / "sub" / "cli.png"
    assert main(["demo", "--model", "digits-ddpm", "--out", str(out), "--repeats", "1", "--threads", "1",
                 "--edit-fraction", "0.1"]) == 0
    assert out.is_file()
    printed = capsys.readouterr().out
    assert "MAC reduction" in printed and "elliptical stroke" in printed
    assert re.search(r"edited area\s+10\.\d%", printed)


def test_cli_random_unet_demo(tmp_path, capsys):
    """The earlier synthetic demo stays reachable: one step of a random 64x64 UNet."""
    out = tmp_path / "random.png"
    assert main(["demo", "--model", "random-unet", "--out", str(out), "--repeats", "1", "--threads", "1",
                 "--edit-fraction", "0.1"]) == 0
    with Image.open(out) as img:
        assert 5 * 256 <= img.width < 5 * 256 + 100
    printed = capsys.readouterr().out
    assert "random-unet" in printed and "edited area" in printed


@pytest.mark.skipif("landscape" not in available_models(), reason="no shipped landscape weights")
def test_landscape_demo_is_the_default_and_equals_dense(tmp_path, capsys):
    """The default demo: a 2% water stroke on the landscape, exact, which equals the dense render."""
    out = tmp_path / "landscape.png"
    assert main(["demo", "--out", str(out), "--repeats", "1", "--threads", "2"]) == 0
    with Image.open(out) as img:            # six 256x512 panels, three by two
        assert 3 * 512 <= img.width < 3 * 512 + 60 and 2 * 256 <= img.height < 2 * 256 + 80
    printed = capsys.readouterr().out
    assert "landscape (256x512), policy exact" in printed and "water brush stroke over 2.0%" in printed
    db = re.search(r"PSNR \(incr\. vs dense\)\s+(\S+) dB", printed).group(1)
    assert db == "inf" or float(db) >= 60
    assert re.search(r"GMACs\s+dense 2\d\.\d+, incremental \d\.\d+", printed)


def test_demo_rejects_unknown_model():
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--model", "nope"])
    assert exc.value.code == 2
    with pytest.raises(ValueError, match="model must be one of"):
        demo.run_demo("unused.png", model="nope")


def test_costs_prints_and_caches_this_machines_kernel_costs(tmp_path, monkeypatch, capsys):
    import json

    from sigec.ir import costs

    monkeypatch.setenv("SIGEC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(costs, "_memo", {})
    assert main(["costs", "--format", "json", "--threads", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["call"] > 0 and "2 threads" in printed["source"]
    cached = json.loads((tmp_path / "kernel-costs.json").read_text())
    assert list(cached.values()) == [printed]
    costs._memo.clear()
    assert main(["costs"]) == 0  # text, from the disk cache
    text = capsys.readouterr().out
    assert f"cache: {tmp_path / 'kernel-costs.json'}" in text and "dense_mac" in text
