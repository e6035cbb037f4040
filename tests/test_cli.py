import subprocess
import sys

import pytest
import torch
from PIL import Image

import sigec
from sigec import demo
from sigec.cli import main


def test_version_flag(capsys):
    # argparse's version action exits; accept a plain return too
    try:
        code = main(["--version"])
    except SystemExit as exc:
        code = exc.code
    assert code in (0, None)
    assert f"sigec {sigec.__version__}" in capsys.readouterr().out


def test_version_via_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "sigec.cli", "--version"],
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


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo.png"
    results = demo.run_demo(out, repeats=1, threads=1)
    assert out.is_file()
    with Image.open(out) as img:
        assert img.format == "PNG"
        assert img.size == results["image_size"]
        # five 256-px panels side by side, plus padding and a label strip
        assert 5 * 256 <= img.width < 5 * 256 + 100
        assert 256 <= img.height < 256 + 60
    assert results["psnr_db"] > 20
    assert 0 < results["incremental_macs"] < results["dense_macs"]
    assert results["mac_reduction"] > 1
    assert abs(results["edited_fraction"] - 0.05) < 0.01
    for key in ("dense_ms", "incremental_ms", "speedup"):
        assert results[key] > 0
    printed = capsys.readouterr().out
    assert "PSNR" in printed and str(out) in printed


def test_cli_demo_writes_png(tmp_path, capsys):
    out = tmp_path / "sub" / "cli.png"
    assert main(["demo", "--out", str(out), "--repeats", "1", "--threads", "1", "--edit-fraction", "0.1"]) == 0
    assert out.is_file()
    assert "MAC reduction" in capsys.readouterr().out
