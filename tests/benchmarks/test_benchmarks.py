"""The benchmark scripts' --quick modes run end to end and report consistent rows."""
import json

import pytest
import torch

from benchmarks import church256, common, spade256x512


@pytest.mark.parametrize("module", [church256, spade256x512])
def test_quick_mode(module, tmp_path):
    out = tmp_path / "result.json"
    result = module.main(["--quick", "--no-timing", "--json", str(out)])
    rows = result["rows"]
    assert [r["fraction"] for r in rows] == [0.05, 0.0]  # the all-false mask is always measured
    edit, empty = rows
    assert 0 < edit["incremental_macs"] < edit["dense_macs"] and edit["active_blocks"] > 0
    assert edit["psnr_db"] > 20 and edit["cache_bytes"] > 0
    # the recorded output: the model's up to float rounding (attention runs as sigec.attention);
    # that it is returned bit for bit is tested in tests/spatial/test_properties.py
    assert empty["incremental_macs"] == 0 and empty["psnr_db"] > 100
    saved = json.loads(out.read_text())
    assert saved["rows"][0]["dense_macs"] == edit["dense_macs"]


def test_profile_prints_the_ops_of_an_incremental_call(capsys, tmp_path):
    church256.main(["--quick", "--no-timing", "--profile", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert "profile of one incremental call, 5.0% edit" in out and "sigec::gather" in out


def test_brush_edit_times_first_and_repeated_calls(tmp_path):
    result = church256.main(["--quick", "--shapes", "brush", "--repeats", "1", "--json", str(tmp_path / "r.json")])
    edit, empty = result["rows"]
    assert edit["shape"] == "brush" and empty["shape"] == "none"
    for key in ("dense_s", "first_s", "incremental_s"):
        median, low, high = edit[key]
        assert 0 < low <= median <= high
    assert edit["speedup"] == pytest.approx(edit["dense_s"][0] / edit["incremental_s"][0])
    assert edit["first_speedup"] == pytest.approx(edit["dense_s"][0] / edit["first_s"][0])
    assert edit["efficiency"] == pytest.approx(edit["speedup"] / edit["mac_ratio"])
    assert edit["first_efficiency"] == pytest.approx(edit["first_speedup"] / edit["mac_ratio"])


@pytest.mark.parametrize("shape", list(common.SHAPES))
@pytest.mark.parametrize("fraction", [0.012, 0.05, 0.3])
def test_edit_shapes_cover_the_requested_area(shape, fraction):
    mask = common.edit_mask(shape, 256, 256, fraction)
    assert mask.dtype == torch.bool and mask.shape == (256, 256)
    assert float(mask.float().mean()) == pytest.approx(fraction, rel=0.05)
    decoy = common.decoy_mask(mask)
    assert int(decoy.sum()) == int(mask.sum()) and not torch.equal(decoy, mask)


def test_profile_rows_sum_to_the_total():
    with torch.profiler.profile() as prof:
        x = torch.randn(64, 64)
        for _ in range(3):
            x = torch.mm(x, x).relu()
    events = prof.key_averages()
    rows = common.profile_rows(events, rows=2)
    assert len(rows) == 3 and rows[-1]["op"].startswith("rest")
    assert rows[0]["ms"] >= rows[1]["ms"]
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert sum(r["calls"] for r in rows) == sum(e.count for e in events)


def test_diffusers_pipelines_quick_rows_are_consistent(tmp_path):
    pytest.importorskip("transformers")  # diffusers' pipelines import it
    from benchmarks import diffusers_pipelines

    out = tmp_path / "pipelines.json"
    result = diffusers_pipelines.main(["--quick", "--case", "sdxl", "--case", "img2img", "--json", str(out)])
    rows = {r["case"]: r for r in result["rows"]}
    assert set(rows) == {"sdxl unet step", "img2img"}
    for row in rows.values():
        assert row["speedup"] == pytest.approx(row["dense_s"][0] / row["incremental_s"][0])
        assert row["efficiency"] == pytest.approx(row["speedup"] / row["mac_ratio"]) and row["mac_ratio"] >= 1
        assert row["psnr_db"] > 20 and 0 < row["edited_fraction"] < 0.05
    assert rows["img2img"]["steps"] == 4  # int(5 * 0.8) UNet calls of the edit (--quick: 5 steps)
    assert json.loads(out.read_text())["rows"][0]["case"] == "sdxl unet step"


def test_block_size_option_reaches_the_engine_and_finer_blocks_compute_fewer_macs(tmp_path):
    # church-small is 64x64: its 64x64 layers take 4-pixel blocks by default
    default = church256.main(["--quick", "--no-timing", "--json", str(tmp_path / "a.json")])
    finer = church256.main(["--quick", "--no-timing", "--block-size", "64:2,32:1", "--json", str(tmp_path / "b.json")])
    assert default["block_size"] is None and finer["block_size"] == {64: 2, 32: 1}
    assert finer["rows"][0]["incremental_macs"] < default["rows"][0]["incremental_macs"]
    assert common.block_sizes("64:2, 32:1") == {64: 2, 32: 1}
    for bad in ("64", "64:0", "a:b", ""):
        with pytest.raises(Exception, match="RESOLUTION:EDGE|positive"):
            common.block_sizes(bad)
