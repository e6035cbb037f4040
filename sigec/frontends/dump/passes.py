"""``sigec dump --passes`` / ``--after PASS``: the spatial pipeline, and the graph after capture and
after each pass. The trace is a mode of ``sigec.core.pipeline``, so the model is checked and captured
as ``sigec.compile`` does it."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from sigec.core.codegen import emit_incremental, emit_recording
from sigec.core.pipeline import Program, compile_in_mode
from sigec.frontends.dump.model import format_shape, res_text, shape_of, short_op
from sigec.frontends.dump.targets import Target, UsageError
from sigec.ir import meta_keys as K
from sigec.ir.settings import CompileSettings
from sigec.passes import ANALYSIS_PASSES, INCREMENTAL_PASSES, PassContext, dump_passes, run_passes
from sigec.runtime import masks as M


def pass_names() -> tuple[list[str], list[str]]:
    return ([p.sigec_pass.name for p in ANALYSIS_PASSES], [p.sigec_pass.name for p in INCREMENTAL_PASSES])


def _fmt_arg(arg) -> str:
    if isinstance(arg, torch.fx.Node):
        return arg.name
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_fmt_arg(a) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner}{',' if len(arg) == 1 else ''})"
    if isinstance(arg, torch.dtype):
        return str(arg)
    return repr(arg)


def _meta_summary(node) -> str:
    parts = []
    spatial = node.meta.get(K.SPATIAL)
    if spatial is not None:
        parts.append(spatial.kind.value + (f" {res_text(spatial.resolution)}" if spatial.resolution else ""))
    mask = node.meta.get(K.MASK)
    if mask is not None:
        text = M.describe(mask)
        parts.append("mask " + (text if len(text) <= 40 else text[:37] + "..."))
    grid = node.meta.get(K.GRID)
    if grid is not None:
        parts.append(f"block {res_text(grid)}")
    window = node.meta.get(K.WINDOW)
    if window is not None and any(window.halo):
        parts.append(f"halo {res_text(window.halo)}")
    decision = node.meta.get(K.DECISION)
    if decision is not None:
        parts.append(decision.kind.value + (f" ({decision.reason})" if decision.reason else ""))
    prologue = node.meta.get(K.PROLOGUE)
    if prologue is not None:
        parts.append(f"prologue {prologue.norm.name if prologue.norm is not None else '-'}+{prologue.activation}")
    origin = node.meta.get(K.ORIGIN)
    if origin is not None:
        parts.append(f"from {origin}")
    return " | ".join(parts)


def format_graph(gm) -> str:
    """One line per node (weights counted, not listed): ``name = op(args) shape | meta``."""
    lines = []
    attrs = 0
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            attrs += 1
            continue
        shape = format_shape(shape_of(node.meta.get("val")))
        if node.op == "placeholder":
            head = f"{node.name}: input"
        elif node.op == "output":
            head = f"return {_fmt_arg(node.args[0])}"
        else:
            args = ", ".join([_fmt_arg(a) for a in node.args] + [f"{k}={_fmt_arg(v)}" for k, v in node.kwargs.items()])
            if len(args) > 90:
                args = args[:87] + "..."
            head = f"{node.name} = {short_op(str(node.target))}({args})"
        meta = _meta_summary(node) if node.op != "output" else ""
        extra = " | ".join(p for p in ((shape if shape != "-" else ""), meta) if p)
        lines.append(f"  {head}" + (f"  # {extra}" if extra else ""))
    if attrs:
        lines.insert(0, f"  ({attrs} get_attr nodes: weights and constants, not listed)")
    return "\n".join(lines)


class PassTrace:
    """A mode of ``sigec.core.pipeline`` that writes the graph after capture and after each spatial pass
    (up to ``after``) instead of building an engine."""

    input_error = ValueError
    takes_edit_mask = True

    def __init__(self, settings: CompileSettings, after: Optional[str], write: Callable[[str], None]):
        self.settings, self.after, self.write = settings, after, write

    def build(self, program: Program) -> None:
        write, after = self.write, self.after
        analysis, incremental = pass_names()
        captured = program.captured
        write(f"\n== captured graph ({len(captured.gm.graph.nodes)} nodes) ==\n{format_graph(captured.gm)}\n")
        ctx = PassContext(self.settings)

        def observer(stage: str):
            def show(name: str, gm) -> None:
                write(f"\n== after {stage} pass {name} ({ctx.timings.get(name, 0.0) * 1e3:.1f} ms) ==\n"
                      f"{format_graph(gm)}\n")
            return show

        gm = run_passes(captured.gm, ctx, ANALYSIS_PASSES, observer=observer("analysis"),
                        stop_after=after if after in analysis else None)
        if after in analysis:
            return
        inc, signature = emit_incremental(gm, ctx.batch)
        ctx.dense_graph = gm
        write(f"\n== codegen: emitted incremental graph ({len(signature.blocks)} block grids) ==\n"
              f"{format_graph(inc)}\n")
        inc = run_passes(inc, ctx, INCREMENTAL_PASSES, observer=observer("incremental"),
                         stop_after=after if after in incremental else None)
        if after in incremental:
            return
        rec = emit_recording(gm, signature.caches)
        write(f"\n== codegen: recording graph ==\n{format_graph(rec)}\n")


def dump_pass_graphs(target: Target, policy: str, block_size: Optional[int], after: Optional[str],
                     write: Callable[[str], None]) -> None:
    """Print the pipeline, then the graph after capture and after each pass (up to ``after``)."""
    analysis, incremental = pass_names()
    if after is not None and after not in analysis + incremental:
        raise UsageError(f"unknown pass {after!r} for --after; passes: {', '.join(analysis + incremental)}")
    settings = CompileSettings(policy=policy, block_size=block_size)
    write("== pipeline ==\n" + dump_passes() + "\n")
    compile_in_mode(PassTrace(settings, after, write), target.model, target.args, target.kwargs or None)
