"""benchmarks/gpu.py: its --smoke run goes through every section on the CPU; without CUDA the real
run refuses clearly; --launches-only needs no GPU."""
import json

import pytest
import torch

from benchmarks import gpu


def test_smoke_measures_the_steps_and_writes_one_json(tmp_path, capsys):
    path = tmp_path / "gpu.json"
    # the SD step at batch 2 (classifier-free guidance); batch 1 runs the same code
    result = gpu.main(["--smoke", "--sections", "church,sd-cfg", "--json", str(path)])
    out = capsys.readouterr().out
    assert json.loads(path.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert result["skipped"] == [] and set(result["section_s"]) == {"church", "sd-cfg"}
    steps = result["rows"]
    assert [(r["case"], r["batch"]) for r in steps] == [("church-small", 1), ("sd-tiny", 2)]
    for row in steps:
        assert row["launches"] >= row["launch_nodes"] > 0 and row["launches"] == sum(row["launches_by_kind"].values())
        assert all(row[k][0] > 0 for k in ("dense_s", "eager_s", "graphs_s"))
        assert row["capture_s"] > 0 and row["capture_bytes"] > 0  # the host replay was captured
        assert row["psnr_db"] > 30
    assert steps[1]["compiled_s"][0] > 0 and steps[1]["torch_compile_s"] > 0
    assert "graphs/compiled" in out and "sd-tiny" in out


def test_smoke_runs_the_sdedit_loop(tmp_path, capsys):
    result = gpu.main(["--smoke", "--sections", "loop", "--json", str(tmp_path / "gpu.json")])
    (loop,) = result["rows"]
    assert loop["steps"] == 1 and loop["loop_incremental_s"] > 0 and loop["loop_dense_s"] > 0
    assert loop["speedup"] > 0 and loop["psnr_db"] > 0 and loop["psnr_no_recompute_db"] > 0
    # the replayed loop computes what the eager one did; every engine captured its step
    assert loop["graphs_vs_eager_psnr_db"] > 60
    assert loop["captures"] >= 3 and loop["loop_graphs_s"] > 0 and loop["capture_bytes"] > 0
    assert "sd-tiny SDEdit loop 128x128" in capsys.readouterr().out


def test_sections_that_do_not_fit_the_budget_are_skipped(tmp_path):
    result = gpu.main(["--smoke", "--budget-s", "1e-9", "--json", str(tmp_path / "gpu.json")])
    assert result["rows"] == []
    assert [s.split(":")[0] for s in result["skipped"]] == ["church", "sd batch 1", "loop", "sd batch 2"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_refuses_to_measure_without_cuda(tmp_path):
    with pytest.raises(SystemExit, match="torch sees none.*--smoke"):
        gpu.main(["--json", str(tmp_path / "gpu.json")])


def test_launches_only_counts_without_a_gpu(tmp_path):
    result = gpu.main(["--launches-only", "--smoke", "--sections", "church", "--json", str(tmp_path / "l.json")])
    (row,) = result["launches"]
    assert row["case"] == "church-small" and row["launches"] >= row["launch_nodes"] > 0
    # a whole call also evaluates the masks and finds the active blocks
    assert row["call_ops"] > 0 and result["launch_costs"] == "machine"


def test_unknown_sections_are_refused():
    with pytest.raises(SystemExit):
        gpu.parse_args(["--sections", "church,vae"])
