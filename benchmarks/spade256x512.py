"""Benchmark: GauGAN's Cityscapes SPADE generator (256x512), dense vs incremental.

35 label channels plus an instance-edge channel, ngf 64, "more" up-sampling (a 4x8 start),
about 281 G MACs dense, seeded random weights. The edit changes a label region to another class
(and the instance edges that follow). Same table and JSON as ``church256.py``.

    python benchmarks/spade256x512.py
    python benchmarks/spade256x512.py --quick      # a small generator, one edit (for tests)
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional


import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script or with -m

from benchmarks.common import (EditCase, benchmark_arguments, parse_fractions, parse_shapes,  # noqa: E402
                               run_edit_benchmark)
from sigec.models import gaugan_cityscapes, instance_edges, label_map, spade_generator  # noqa: E402


def spade_case(quick: bool) -> EditCase:
    if quick:
        model, classes, size = spade_generator(label_channels=9, start=(4, 8)), 8, (64, 128)
    else:
        model, classes, size = gaugan_cityscapes(), 35, (256, 512)
    seg = label_map(classes + 1, size[0], width=size[1], edge_channel=True)
    labels = seg[0, :classes].argmax(0)

    def edit(inputs: tuple, mask: torch.Tensor) -> tuple[tuple, torch.Tensor]:
        # the region takes the class that is least common inside it, so the edit really changes it
        counts = torch.bincount(labels[mask], minlength=classes)
        new_labels = torch.where(mask, counts.argmin(), labels)
        onehot = F.one_hot(new_labels, classes).permute(2, 0, 1)[None].float()
        edited = torch.cat([onehot, instance_edges(new_labels)[None, None]], dim=1)
        changed = (edited != inputs[0]).any(dim=1)[0]
        return (edited,), changed

    name = "spade-small" if quick else "gaugan-cityscapes"
    return EditCase(name, model, (seg,), edit)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = benchmark_arguments(__doc__.splitlines()[0], "out/spade256x512.json")
    args = parser.parse_args(argv)
    fractions, shapes = parse_fractions(parser, args), parse_shapes(parser, args)
    if args.quick:
        fractions, args.repeats = [0.05], 1
    return run_edit_benchmark(spade_case(args.quick), args, fractions, shapes)


if __name__ == "__main__":
    main()
