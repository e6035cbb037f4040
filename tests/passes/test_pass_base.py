import pytest
import torch
import torch.nn as nn

from sigec.core.capture import capture
from sigec.passes import ANALYSIS_PASSES, INCREMENTAL_PASSES, PassContext, PassError, check_order, dump_passes, run_passes
from sigec.passes import analyze_halo, classify_spatial, partition, propagate_masks, sigec_pass
from sigec.ir.settings import CompileSettings


def test_pipeline_order_is_valid_and_printable():
    check_order(ANALYSIS_PASSES)
    text = dump_passes()
    for p in ANALYSIS_PASSES + INCREMENTAL_PASSES:
        assert p.sigec_pass.name in text


def test_order_violation_is_named():
    with pytest.raises(PassError, match="'partition' requires"):
        check_order([classify_spatial, partition, propagate_masks, analyze_halo])


def test_failing_pass_is_named_with_its_predecessors():
    @sigec_pass(requires=("sigec.spatial",))
    def explode(gm, ctx):
        raise KeyError("boom")

    gm = capture(nn.Conv2d(1, 1, 1), (torch.randn(1, 1, 4, 4),)).gm
    with pytest.raises(PassError, match=r"'explode' pass after the following passes: \['classify_spatial'\]"):
        run_passes(gm, PassContext(CompileSettings()), [classify_spatial, explode])


def test_unknown_stop_after_lists_passes():
    gm = capture(nn.Conv2d(1, 1, 1), (torch.randn(1, 1, 4, 4),)).gm
    with pytest.raises(PassError, match="is not a valid pass! Passes: canonicalize_tokens, classify_spatial"):
        run_passes(gm, PassContext(CompileSettings()), ANALYSIS_PASSES, stop_after="nope")


def test_observer_sees_every_pass():
    seen = []
    gm = capture(nn.Conv2d(1, 1, 1), (torch.randn(1, 1, 4, 4),)).gm
    run_passes(gm, PassContext(CompileSettings()), ANALYSIS_PASSES, observer=lambda name, g: seen.append(name))
    assert seen == [p.sigec_pass.name for p in ANALYSIS_PASSES]
