import pathlib

from sigec.passes import ANALYSIS_PASSES, INCREMENTAL_PASSES, TEMPORAL_PASSES, TILING_PASSES

ROOT = pathlib.Path(__file__).resolve().parents[2]
#: modules of passes/ that hold no pass (shared tables and machinery)
SUPPORT = {"__init__", "op_table", "pass_base", "verifier", "tile_geometry", "tile_plan"}
PIPELINES = {"ANALYSIS_PASSES": ANALYSIS_PASSES, "INCREMENTAL_PASSES": INCREMENTAL_PASSES,
             "TEMPORAL_PASSES": TEMPORAL_PASSES, "TILING_PASSES": TILING_PASSES}


def test_every_pass_in_every_pipeline_has_a_test_file():
    missing = sorted({f"{pipeline}: {p.sigec_pass.name}" for pipeline, passes in PIPELINES.items() for p in passes
                      if not (ROOT / "tests" / "passes" / f"test_{p.sigec_pass.name}.py").exists()})
    assert not missing, f"passes without tests/passes/test_<name>.py: {missing}"


def test_every_pass_module_is_in_a_pipeline_and_tested():
    """A pass module nobody runs, or one added without its test file, is caught here too."""
    in_pipelines = {p.sigec_pass.name for passes in PIPELINES.values() for p in passes}
    modules = {f.stem for f in (ROOT / "passes").glob("*.py")} - SUPPORT
    assert modules, "no pass modules found under passes/"
    assert modules <= in_pipelines, f"pass modules in no pipeline: {sorted(modules - in_pipelines)}"
    untested = sorted(m for m in modules if not (ROOT / "tests" / "passes" / f"test_{m}.py").exists())
    assert not untested, f"pass modules without tests/passes/test_<module>.py: {untested}"
    for support in SUPPORT - {"__init__"}:
        assert (ROOT / "passes" / f"{support}.py").exists()
