import pathlib

from sigec.passes import ANALYSIS_PASSES, INCREMENTAL_PASSES

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_every_pass_module_has_a_test_file():
    missing = [p.sigec_pass.name for p in ANALYSIS_PASSES + INCREMENTAL_PASSES
               if not (ROOT / "tests" / "passes" / f"test_{p.sigec_pass.name}.py").exists()]
    assert not missing, f"passes without tests/passes/test_<name>.py: {missing}"
    for support in ("op_table", "pass_base", "verifier"):
        assert (ROOT / "passes" / f"{support}.py").exists()
