"""``sigec dump`` and ``sigec bench``: every format on the church-structured UNet, the pass dump,
.pt2 and file targets, PNG / .npy masks, and the error cases (exit codes and messages)."""
import html.parser
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sigec
from sigec.frontends.cli import main
from sigec.frontends.edits import ellipse_mask
from sigec.passes import ANALYSIS_PASSES, INCREMENTAL_PASSES
from tests import cli_targets

REPO = Path(__file__).resolve().parents[2]
CHURCH = "tests.cli_targets:church_small"
TINY = "tests.cli_targets:tiny"
FORMATS = ("text", "json", "dot", "svg", "html")


def run_cli(capsys, *argv):
    """``main(argv)`` -> (exit code, stdout, stderr); argparse's SystemExit becomes a code."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def compiled(factory, policy="sige", block_size=None):
    model, args, *rest = factory()
    return sigec.compile(model, args, rest[0] if rest else None, policy=policy, block_size=block_size)


@pytest.fixture(scope="module")
def church_dumps(tmp_path_factory):
    """`sigec dump` of the church UNet in every format (default mask: a 5% ellipse)."""
    folder = tmp_path_factory.mktemp("dumps")
    out = {}
    for fmt in FORMATS:
        path = folder / f"church.{fmt}"
        assert main(["dump", CHURCH, "--format", fmt, "--out", str(path)]) == 0
        out[fmt] = path.read_text(encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def church_engine():
    return compiled(cli_targets.church_small)


@pytest.fixture(scope="module")
def church_report(church_engine):
    return church_engine.report(mask=ellipse_mask(64, 64, 0.05))


# -- formats on the church UNet ---------------------------------------------------------------
def test_json_totals_and_nodes_equal_engine_report(church_dumps, church_engine, church_report):
    data = json.loads(church_dumps["json"])
    rep = church_report
    assert data["totals"]["dense_macs"] == rep.dense_macs
    assert data["totals"]["incremental_macs"] == rep.incremental_macs
    assert data["totals"]["ratio"] == pytest.approx(rep.dense_macs / rep.incremental_macs)
    assert data["totals"]["fallbacks"] == rep.fallbacks()
    assert data["totals"]["input_mask_fraction"] == pytest.approx(rep.input_mask_fraction)
    assert [n["name"] for n in data["nodes"]] == [n.name for n in rep.nodes]
    for row, n in zip(data["nodes"], rep.nodes):
        assert (row["op"], row["decision"], row["reason"]) == (n.op, n.decision, n.reason)
        assert (row["dense_macs"], row["incremental_macs"]) == (n.dense_macs, n.incremental_macs)
        assert row["block"] == (list(n.block) if n.block else None)
        assert row["halo"] == (list(n.halo) if n.halo else None)
        for key in ("resolution", "mask", "mask_fraction", "active_blocks", "shape"):
            assert key in row
    conv = next(r for r in data["nodes"] if r["name"] == "conv2d")
    assert conv["shape"] == [1, 16, 64, 64] and conv["resolution"] == [64, 64]
    assert data["settings"]["policy"] == "sige" and data["input_resolution"] == [64, 64]
    assert data["graphs"]["recording"] == church_engine.recording.code.strip("\n")
    assert data["graphs"]["incremental"] == church_engine.incremental.code.strip("\n")
    # block maps: one per grid of the incremental graph, active blocks as mask_stats finds them
    stats = church_engine.mask_stats(ellipse_mask(64, 64, 0.05), every_node=True)
    assert len(data["block_maps"]) == len(church_engine.signature.blocks) > 0
    for bm, key in zip(data["block_maps"], church_engine.signature.blocks):
        assert bm["resolution"] == list(key[0].res) and bm["block"] == list(key[1])
        assert sorted(map(tuple, bm["active"])) == sorted(map(tuple, stats["blocks"][key].tolist()))
        assert sum(row.count("#") for row in bm["rows"]) == bm["active_blocks"]


def test_text_has_every_section(church_dumps, church_report):
    text = church_dumps["text"]
    for header in ("== nodes (", "== block maps (", "== totals ==", "== recording graph ==",
                   "== incremental graph =="):
        assert header in text
    assert f"{church_report.dense_macs:,}" in text and f"{church_report.incremental_macs:,}" in text
    header = next(line for line in text.splitlines() if line.startswith("node "))
    for column in ("op", "shape", "res", "mask", "decision", "block", "halo", "dense MACs", "incr MACs", "reason"):
        assert column in header
    assert "def forward(self" in text
    assert any(line.startswith("    ") and "#" in line for line in text.splitlines())  # an ASCII block map


def test_dot_parses_with_decisions(church_dumps, church_report):
    pydot = pytest.importorskip("pydot")
    nx = pytest.importorskip("networkx")
    graphs = pydot.graph_from_dot_data(church_dumps["dot"])
    assert graphs and len(graphs) == 1
    g = nx.drawing.nx_pydot.from_pydot(graphs[0])
    assert g.is_directed()

    def attr(name, key):
        return g.nodes[name][key].strip('"')

    for n in church_report.nodes:
        assert attr(n.name, "decision") == n.decision
    assert attr("sample", "decision") == "input" and attr("output", "decision") == "output"
    assert g.number_of_edges() >= g.number_of_nodes() - 1
    assert nx.is_directed_acyclic_graph(nx.DiGraph(g))
    assert g.has_edge("sample", "conv2d")
    assert not any("weight" in name for name in g.nodes)   # parameters are left out


def test_svg_is_well_formed_with_a_panel_per_grid(church_dumps, church_engine):
    root = ET.fromstring(church_dumps["svg"])
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    panels = root.findall("{http://www.w3.org/2000/svg}g")
    assert len(panels) == 1 + len(church_engine.signature.blocks)   # input mask + one per grid
    texts = " ".join(t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text"))
    assert "input mask 64x64" in texts and "grid 0: 64x64" in texts and "dense MACs" in texts


class _NestingChecker(html.parser.HTMLParser):
    VOID = {"meta", "br", "hr", "img", "input", "link"}

    def __init__(self):
        super().__init__()
        self.stack, self.ids, self.counts = [], [], {}

    def handle_starttag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1
        self.ids += [v for k, v in attrs if k == "id"]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1:]}>"
        self.stack.pop()


def test_html_is_one_self_contained_page(church_dumps, church_report):
    page = church_dumps["html"]
    assert page.startswith("<!DOCTYPE html>")
    checker = _NestingChecker()
    checker.feed(page)
    checker.close()
    assert checker.stack == []
    assert {"settings", "totals", "block-maps", "nodes", "fallbacks", "recording-graph",
            "incremental-graph"} <= set(checker.ids)
    assert checker.counts["svg"] == 1 and checker.counts["pre"] == 2
    assert checker.counts["tr"] == 1 + len(church_report.nodes)
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")   # nothing external
    assert "<script" not in page and "<link" not in page
    assert f"{church_report.incremental_macs:,}" in page


def test_stdout_is_the_default_output(capsys):
    code, out, err = run_cli(capsys, "dump", TINY, "--format", "json")
    assert code == 0 and err == ""
    assert json.loads(out)["input_resolution"] == [32, 32]


# -- policies, masks, targets -----------------------------------------------------------------
def test_exact_policy_and_block_size(capsys):
    code, out, _ = run_cli(capsys, "dump", TINY, "--format", "json", "--policy", "exact",
                           "--block-size", "8", "--mask-fraction", "0.2")
    assert code == 0
    data = json.loads(out)
    rep = compiled(cli_targets.tiny, "exact", 8).report(mask=ellipse_mask(32, 32, 0.2))
    assert data["settings"]["policy"] == "exact" and data["settings"]["block_size"] == 8
    assert (data["totals"]["dense_macs"], data["totals"]["incremental_macs"]) == (rep.dense_macs,
                                                                                   rep.incremental_macs)
    assert {tuple(b["block"]) for b in data["block_maps"]} == {(8, 8)}


def _square_mask(size=32):
    mask = np.zeros((size, size), dtype=bool)
    mask[4:12, 18:30] = True
    return mask


@pytest.mark.parametrize("kind", ["png", "npy-bool", "npy-float"])
def test_mask_files(tmp_path, capsys, kind):
    mask = _square_mask()
    if kind == "png":
        path = tmp_path / "m.png"
        Image.fromarray(mask.astype(np.uint8) * 255).convert("RGB").save(path)
    else:
        path = tmp_path / "m.npy"
        np.save(path, mask if kind == "npy-bool" else mask.astype(np.float32))
    code, out, _ = run_cli(capsys, "dump", TINY, "--mask", str(path), "--format", "json")
    assert code == 0
    data = json.loads(out)
    assert data["mask"]["pixels"] == int(mask.sum()) and data["mask"]["source"] == f"file {path}"
    rep = compiled(cli_targets.tiny).report(mask=torch.from_numpy(mask))
    assert data["totals"]["incremental_macs"] == rep.incremental_macs
    assert data["totals"]["input_mask_fraction"] == pytest.approx(mask.mean())


def test_pt2_target(tmp_path, capsys):
    model, args = cli_targets.tiny()
    path = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(model, args), str(path))
    code, out, err = run_cli(capsys, "dump", str(path), "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    assert data["target"] == str(path) and data["input_resolution"] == [32, 32]
    rep = compiled(cli_targets.tiny).report(mask=ellipse_mask(32, 32, 0.05))
    assert data["totals"]["dense_macs"] == rep.dense_macs
    assert data["totals"]["incremental_macs"] == rep.incremental_macs


def test_file_and_kwargs_targets(capsys):
    code, out, err = run_cli(capsys, "dump", str(REPO / "tests" / "cli_targets.py") + ":tiny", "--format", "text")
    assert code == 0, err
    assert "== totals ==" in out
    code, out, err = run_cli(capsys, "dump", "tests.cli_targets:tiny_with_kwargs", "--format", "json")
    assert code == 0, err
    assert [i["name"] for i in json.loads(out)["inputs"]] == ["x", "scale"]


def test_out_creates_folders(tmp_path, capsys):
    path = tmp_path / "a" / "b" / "tiny.svg"
    code, out, err = run_cli(capsys, "dump", TINY, "--format", "svg", "--out", str(path))
    assert code == 0 and out == ""
    assert f"wrote {path}" in err
    ET.parse(path)


# -- --passes ---------------------------------------------------------------------------------
def test_passes_prints_every_pass(capsys):
    code, out, _ = run_cli(capsys, "dump", TINY, "--passes")
    assert code == 0
    assert out.startswith("== pipeline ==")
    order = ["== captured graph"] + [f"== after analysis pass {p.sigec_pass.name} " for p in ANALYSIS_PASSES] + [
        "== codegen: emitted incremental graph"] + [
        f"== after incremental pass {p.sigec_pass.name} " for p in INCREMENTAL_PASSES] + ["== codegen: recording graph"]
    positions = [out.index(h) for h in order]
    assert positions == sorted(positions)
    partition = out.split("== after analysis pass partition")[1].split("== after")[0]
    assert "sparse (" in partition and "block 2x2" in partition  # 32x32: a sixteenth of the side


def test_after_stops_at_the_pass(capsys):
    code, out, _ = run_cli(capsys, "dump", TINY, "--after", "propagate_masks")
    assert code == 0
    assert "== after analysis pass propagate_masks" in out
    assert "analyze_halo (" not in out and "== codegen" not in out
    assert "mask sige@32x32" in out
    code, out, _ = run_cli(capsys, "dump", TINY, "--passes", "--after", "fold_residual_add")
    assert code == 0
    assert "== after incremental pass fold_residual_add" in out and "fuse_scatter_gather (" not in out


def test_after_unknown_pass_lists_the_passes(capsys):
    code, out, err = run_cli(capsys, "dump", TINY, "--passes", "--after", "nope")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert "unknown pass 'nope'" in lines[0]
    for p in ANALYSIS_PASSES + INCREMENTAL_PASSES:
        assert p.sigec_pass.name in lines[0]


def test_passes_refuses_other_formats(capsys):
    code, _, err = run_cli(capsys, "dump", TINY, "--passes", "--format", "json")
    assert code == 2 and "--passes" in err


# -- errors -----------------------------------------------------------------------------------
def _bad_files(tmp_path):
    (tmp_path / "garbage.pt2").write_bytes(b"not a zip archive")
    torch.save({"w": torch.zeros(2)}, tmp_path / "checkpoint.pt2")
    np.save(tmp_path / "small.npy", np.ones((16, 16), dtype=bool))
    Image.new("L", (48, 32)).save(tmp_path / "wide.png")
    (tmp_path / "notes.png").write_text("not an image")
    np.save(tmp_path / "cube.npy", np.ones((3, 32, 32), dtype=bool))


ERROR_CASES = [
    (["dump", "nosuch_pkg.models:make"], "cannot import module 'nosuch_pkg.models' from TARGET "
                                         "'nosuch_pkg.models:make': No module named 'nosuch_pkg'"),
    (["dump", "tests.cli_targets:nope"], "module 'tests.cli_targets' has no attribute 'nope'"),
    (["dump", "tests.cli_targets:NOT_CALLABLE"], "is not callable"),
    (["dump", "tests.cli_targets:not_a_pair"], "must return (model, args) or (model, args, kwargs), got str"),
    (["dump", "tests.cli_targets:raises"], "factory 'tests.cli_targets:raises' raised RuntimeError: factory exploded"),
    (["dump", "tests.cli_targets"], "must be package.module:factory"),
    (["dump", "{tmp}/garbage.pt2"], "is not a torch.export program (.pt2): not a zip archive"),
    (["dump", "{tmp}/checkpoint.pt2"], "is not a torch.export program (.pt2)"),
    (["dump", "{tmp}/missing.pt2"], "missing.pt2': no such file"),
    (["dump", TINY, "--mask", "{tmp}/small.npy"], "is 16x16 (height x width) but the model's input resolution is 32x32"),
    (["dump", TINY, "--mask", "{tmp}/wide.png"], "is 32x48 (height x width) but the model's input resolution is 32x32"),
    (["dump", TINY, "--mask", "{tmp}/absent.png"], "mask file '{tmp}/absent.png' does not exist"),
    (["dump", TINY, "--mask", "{tmp}/notes.png"], "not a PNG image or a .npy array"),
    (["dump", TINY, "--mask", "{tmp}/cube.npy"], "expected a 2-D H x W array"),
    (["bench", "tests.cli_targets:nope"], "has no attribute 'nope'"),
    (["bench", TINY, "--mask", "{tmp}/small.npy"], "is 16x16 (height x width)"),
]


@pytest.mark.parametrize("argv,message", ERROR_CASES, ids=[" ".join(a[:2]) + " " + a[-1][-14:] for a, _ in ERROR_CASES])
def test_errors_are_one_line_and_exit_1(tmp_path, capsys, argv, message):
    _bad_files(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, out, err = run_cli(capsys, *argv)
    assert code == 1
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sigec: error: ")
    assert message.replace("{tmp}", str(tmp_path)) in lines[0]
    assert "Traceback" not in err


def test_unknown_format_is_a_usage_error(capsys):
    code, out, err = run_cli(capsys, "dump", TINY, "--format", "xml")
    assert code == 2 and out == ""
    assert "invalid choice: 'xml'" in err and err.startswith("usage: sigec dump")


def test_mask_options_are_exclusive(capsys):
    code, _, err = run_cli(capsys, "dump", TINY, "--mask", "m.png", "--mask-fraction", "0.1")
    assert code == 2 and "not allowed with argument" in err


def test_debug_shows_the_traceback(capsys):
    code, _, err = run_cli(capsys, "dump", "tests.cli_targets:raises", "--debug")
    assert code == 1
    assert "Traceback (most recent call last)" in err and "factory exploded" in err
    assert err.strip().splitlines()[-1].startswith("sigec: error: factory")
    code, _, err = run_cli(capsys, "--debug", "dump", "tests.cli_targets:nope")
    assert code == 1 and "Traceback" in err


def test_help_lists_the_commands(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for command in ("dump", "bench", "demo"):
        assert command in out
    code, out, _ = run_cli(capsys, "dump", "--help")
    assert code == 0 and "--mask-fraction" in out and "--after PASS" in out


def test_python_dash_m_dump_and_error():
    ok = subprocess.run([sys.executable, "-m", "sigec.frontends.cli", "dump", TINY, "--format", "json"],
                        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["totals"]["dense_macs"] > 0
    bad = subprocess.run([sys.executable, "-m", "sigec.frontends.cli", "dump", "nosuch_pkg:f"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip() == ("sigec: error: cannot import module 'nosuch_pkg' from TARGET 'nosuch_pkg:f': "
                                  "No module named 'nosuch_pkg'")


# -- bench ------------------------------------------------------------------------------------
def test_bench_json(capsys):
    code, out, err = run_cli(capsys, "bench", TINY, "--repeats", "2", "--threads", "1", "--format", "json")
    assert code == 0, err
    r = json.loads(out)
    rep = compiled(cli_targets.tiny).report(mask=ellipse_mask(32, 32, 0.05))
    assert (r["dense_macs"], r["incremental_macs"]) == (rep.dense_macs, rep.incremental_macs)
    for key in ("dense_ms", "dense_ms_min", "dense_ms_max", "incremental_ms", "incremental_ms_min",
                "incremental_ms_max", "speedup"):
        assert r[key] > 0
    assert r["dense_ms_min"] <= r["dense_ms"] <= r["dense_ms_max"]
    assert r["threads"] == 1 and r["repeats"] == 2
    assert r["psnr_db"] is None or r["psnr_db"] > 20


def test_bench_text_exact_is_lossless_on_a_conv_net(capsys):
    code, out, err = run_cli(capsys, "bench", "tests.cli_targets:tiny_with_kwargs", "--policy", "exact",
                             "--repeats", "1", "--threads", "1", "--mask-fraction", "0.1")
    assert code == 0, err
    for label in ("dense latency", "incremental latency", "speedup", "MAC reduction", "PSNR"):
        assert label in out
    psnr = out.split("PSNR (incr. vs dense)")[1].split("dB")[0].strip()
    assert psnr == "inf" or float(psnr) > 60
