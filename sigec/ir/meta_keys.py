"""Names of the analysis results that passes store in ``node.meta``.

Every key is defined here once. Each entry names the pass that writes it and who reads it.
"""

#: ``SpatialInfo`` (passes/classify_spatial.py). Read by every later pass, codegen and the reference runtime.
SPATIAL = "sigec.spatial"
#: ``MaskExpr`` governing a value that depends on a spatial input (passes/propagate_masks.py).
#: Read by analyze_halo, partition, codegen, the reference runtime and the report.
MASK = "sigec.mask"
#: ``OpRule`` from the op table that matched the node (passes/classify_spatial.py). Read by all later passes.
RULE = "sigec.rule"
#: ``(bh, bw)`` output block size of an image-like value (passes/analyze_halo.py). Read by partition and codegen.
GRID = "sigec.grid"
#: ``WindowSpec`` of the input window each output block reads (passes/analyze_halo.py). Read by partition, codegen.
WINDOW = "sigec.window"
#: ``Decision`` sparse / dense / fallback with its reason (passes/partition.py). Read by codegen, reference, report.
DECISION = "sigec.decision"
#: ``GatherPrologue`` folded into the gather feeding a local op (passes/fold_norm_activation.py). Read by codegen.
PROLOGUE = "sigec.prologue"
#: ``str`` name of the dense-graph node an incremental-graph node stands for (codegen). Read by the report.
ORIGIN = "sigec.origin"
#: ``"cut"`` / ``"partial"`` / ``"full"``: a node's part in a cut specialization (passes/specialize_cut.py).
#: Read by sigec.temporal's reports.
CUT_ROLE = "sigec.cut_role"
#: ``TileRule`` of a value under tiled execution (passes/classify_tiling.py). Read by schedule_tiles and runtime/tiled.py.
TILE = "sigec.tile"
#: ``TileSchedule`` (whole or tiled, phase, held) of a value (passes/schedule_tiles.py). Read by runtime/tiled.py, sigec/tiling/.
SCHEDULE = "sigec.schedule"
