"""``sigec dump``: load a model, compile it and show the plan for an edit mask.

A *target* is either ``package.module:factory`` (or ``path/to/file.py:factory``), where
``factory()`` returns ``(model, args)`` or ``(model, args, kwargs)`` (or an ``ExportedProgram``
alone), or a ``.pt2`` file written by ``torch.export.save``. The model is compiled with
``sigec.compile``, the mask (a PNG / ``.npy`` file, or an ellipse over a given fraction) is
evaluated with ``engine.mask_stats`` and ``engine.report``, and the result is rendered as:

* ``text`` - a table of every node, ASCII block maps, totals and the two generated graphs;
* ``json`` - the same, machine-readable (totals equal ``engine.report(mask=...)``'s);
* ``dot``  - the analysed graph, nodes coloured by decision (Graphviz DOT);
* ``svg``  - per-resolution block maps and the input mask, one self-contained SVG;
* ``html`` - one self-contained page: settings, totals, block maps, node table, graphs.

Each format has its module (``text``, ``dot``, ``svg``, ``html``; JSON in ``render``);
``passes`` prints the graph after each pass instead (``sigec dump --passes``).
"""
from __future__ import annotations

from sigec.frontends.dump.model import BlockMap, Dump, build_dump, format_shape, short_op
from sigec.frontends.dump.passes import PassTrace, dump_pass_graphs, format_graph, pass_names
from sigec.frontends.dump.render import FORMATS, RENDERERS, render, render_json
from sigec.frontends.dump.targets import (CliError, Target, UsageError, compile_target, flat_inputs, load_target,
                                          read_mask_file, resolve_mask)
from sigec.frontends.dump.text import fallback_summary

__all__ = ["BlockMap", "CliError", "Dump", "FORMATS", "PassTrace", "RENDERERS", "Target", "UsageError", "build_dump",
           "compile_target", "dump_pass_graphs", "fallback_summary", "flat_inputs", "format_graph", "format_shape",
           "load_target", "pass_names", "read_mask_file", "render", "render_json", "resolve_mask", "short_op"]
