"""Capture a model as a flat ATen GraphModule with ``torch.export`` (non-strict).

High-level ATen ops are kept (no ``run_decompositions``). The pytree calling convention of
``ExportedProgram.module()`` is replaced by a flat one; the engine flattens user arguments with
the recorded ``in_spec`` and rebuilds outputs with ``out_spec``.
"""
from __future__ import annotations

import dataclasses
import os
import traceback
from typing import Any, Optional

import torch
from torch.fx import GraphModule
from torch.utils import _pytree as pytree


class CaptureError(RuntimeError):
    """The model could not be captured; the message names the construct and a fix."""


@dataclasses.dataclass
class Captured:
    gm: GraphModule
    in_spec: Any
    out_spec: Any
    input_names: list[str]


_HINTS = (
    ("data-dependent", "a Python branch or size depends on tensor values: use torch.where / torch.cond, "
                       "or compute the value outside the model and pass it in"),
    ("GuardOnDataDependent", "a Python branch depends on tensor values: use torch.where or torch.cond"),
    ("item()", "a tensor is converted to a Python number (.item()/.tolist()): keep it a tensor"),
    ("not supported", "an operation is unsupported by torch.export: see the construct named above"),
    ("pytree", "an input or output type is not a pytree: return tensors, tuples, lists, dicts or dataclasses "
               "registered with torch.utils._pytree"),
)


def _user_frame(exc: BaseException) -> Optional[str]:
    """The innermost traceback frame outside torch and sigec: the line that could not be traced."""
    import sigec.passes
    import sigec.runtime

    skip = tuple(os.path.dirname(m.__file__) for m in (torch, sigec.passes, sigec.runtime)) + (
        os.path.dirname(__file__),)
    frames = []
    tb = exc
    while tb is not None:  # the user's line may sit in a chained exception
        frames += [f for f in traceback.extract_tb(tb.__traceback__)
                   if not f.filename.startswith(skip) and not f.filename.startswith("<")]
        tb = tb.__cause__ or tb.__context__
    if not frames:
        return None
    f = frames[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: {f.line}"


def capture(model: "torch.nn.Module | torch.export.ExportedProgram", args: Optional[tuple] = None,
            kwargs: Optional[dict] = None) -> Captured:
    """Capture ``model`` with its example inputs; an ``ExportedProgram`` (say, loaded from a
    ``.pt2`` file) is used as it is, with its own example inputs unless others are given."""
    if isinstance(model, torch.export.ExportedProgram):
        if args is None:
            if model.example_inputs is None:
                raise CaptureError("the exported program carries no example inputs; pass example_args")
            args, kwargs = model.example_inputs
        return _from_exported(model, tuple(args), dict(kwargs or {}))
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"sigec.compile expects a torch.nn.Module or an ExportedProgram, got {type(model).__name__}")
    if args is None:
        raise TypeError("sigec.compile needs example inputs for a module: compile(model, example_args)")
    if not isinstance(args, tuple):
        args = (args,)
    kwargs = dict(kwargs or {})
    try:
        with torch.no_grad():
            ep = torch.export.export(model, args, kwargs, strict=False)
    except Exception as exc:  # export raises many types; all get the same treatment
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = _user_frame(exc)
        hint = next((h for key, h in _HINTS if key in str(exc) or key in type(exc).__name__),
                    "simplify the construct named above, or run torch.export.export(model, args, "
                    "strict=False) directly to see the full report")
        msg = f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: {first}"
        if where:
            msg += f"\n  failing construct: {where}"
        msg += f"\n  fix: {hint}"
        raise CaptureError(msg) from exc
    return _from_exported(ep, args, kwargs)


def _refuse_in_place(ep: torch.export.ExportedProgram) -> None:
    """In-place ops are refused: on state they change the model, on values they alias tensors
    that the incremental graph keeps apart (blocks and full tensors)."""
    for node in ep.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not schema.is_mutable:
            continue
        written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        trace = (node.meta.get("stack_trace") or "").strip().splitlines()
        where = f"\n  at {trace[-2].strip()} {trace[-1].strip()}" if len(trace) >= 2 else ""
        raise CaptureError(f"the model changes a tensor in place ({node.target}, argument {written}, node "
                           f"{node.name}){where}\n  fix: use the out-of-place form (x = x + y instead of "
                           "x += y or x.add_(y)); sigec needs every value to be a fresh tensor")


def _from_exported(ep: torch.export.ExportedProgram, args: tuple, kwargs: dict) -> Captured:
    mutated = list(ep.graph_signature.buffers_to_mutate.values())
    if mutated:
        raise CaptureError(f"the model changes its own buffers in forward ({mutated[:5]}): a cached run "
                           "could not reproduce that. Put it in eval mode, or move the state update out "
                           "of forward")
    _refuse_in_place(ep)
    gm = ep.module()
    for node in list(gm.graph.nodes):  # input guards are re-checked by the engine itself
        if node.op == "call_module" and not node.users:
            gm.graph.erase_node(node)
    gm.graph._codegen = torch.fx.graph.CodeGen()
    gm.graph.lint()
    gm.recompile()
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    flat, _ = pytree.tree_flatten((args, kwargs))
    if len(flat) != len(names):
        raise CaptureError(f"the exported program has {len(names)} inputs but the example has {len(flat)} "
                           "leaves; non-tensor example inputs must be constants of the model")
    return Captured(gm, ep.call_spec.in_spec, ep.call_spec.out_spec, names)


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule with a copy of ``gm``'s graph (nodes, names and a shallow copy of each
    ``node.meta``) over the same parameters and buffers, so passes can annotate it independently."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    graph._codegen = gm.graph._codegen
    copy = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    copy.meta.update(gm.meta)
    return copy


def as_captured(gm: torch.fx.GraphModule) -> Captured:
    """A graph derived from a captured one by a pass (a temporal cut's full or partial graph), with
    the calling convention capture gives: its placeholders in order, its output node's structure."""
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    _, in_spec = pytree.tree_flatten((tuple(names), {}))
    _, out_spec = pytree.tree_flatten(output.args[0])
    return Captured(gm, in_spec, out_spec, names)
