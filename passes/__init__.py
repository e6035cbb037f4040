"""Graph passes. ``ANALYSIS_PASSES`` run on the captured graph in order and annotate
``node.meta``; ``INCREMENTAL_PASSES`` rewrite the emitted incremental graph. The invariants every
pass keeps are in ``README.md`` beside this file and checked by ``verifier.verify``.
"""
from sigec.passes.pass_base import PassContext, PassError, check_order, run_passes, sigec_pass
from sigec.passes.canonicalize_tokens import canonicalize_tokens
from sigec.passes.classify_spatial import classify_spatial
from sigec.passes.propagate_masks import propagate_masks
from sigec.passes.analyze_halo import analyze_halo
from sigec.passes.partition import partition
from sigec.passes.fold_norm_activation import fold_norm_activation
from sigec.passes.drop_identity_ops import drop_identity_ops
from sigec.passes.strided_nearest_downsample import strided_nearest_downsample
from sigec.passes.fold_into_affine import fold_into_affine
from sigec.passes.fuse_scatter_gather import fuse_scatter_gather
from sigec.passes.native_linears import native_linears
from sigec.passes.fold_residual_add import fold_residual_add
from sigec.passes.specialize_cut import specialize_cut
from sigec.passes.classify_tiling import classify_tiling
from sigec.passes.schedule_tiles import schedule_tiles

ANALYSIS_PASSES = [canonicalize_tokens, classify_spatial, propagate_masks, analyze_halo, partition, fold_norm_activation]
INCREMENTAL_PASSES = [drop_identity_ops, strided_nearest_downsample, fold_into_affine, fold_residual_add,
                      fuse_scatter_gather, native_linears]
#: temporal reuse (sigec.temporal): the full and partial graphs of a cut, on the captured graph
TEMPORAL_PASSES = [specialize_cut]
#: tiled execution (sigec.tiling): the spatial classification, then per-value tiling rules and the schedule
TILING_PASSES = [classify_spatial, classify_tiling, schedule_tiles]


def dump_passes() -> str:
    """The pipeline, one pass per line, with what each needs and provides."""
    lines = []
    for stage, passes in (("analysis", ANALYSIS_PASSES), ("incremental", INCREMENTAL_PASSES)):
        for p in passes:
            info = p.sigec_pass
            lines.append(f"{stage:12s} {info.name:24s} requires={list(info.requires)} provides={list(info.provides)}")
    return "\n".join(lines)


__all__ = ["ANALYSIS_PASSES", "INCREMENTAL_PASSES", "TEMPORAL_PASSES", "TILING_PASSES", "PassContext", "PassError",
           "check_order", "run_passes", "sigec_pass", "dump_passes"]
