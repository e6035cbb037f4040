"""``torch.compile(model, backend="sigec")``: the same pipeline behind dynamo.

Dynamo hands the backend an FX graph whose inputs are the call's tensors followed (or
interleaved) with the module's parameters and buffers. The backend binds the parameters back
as attributes of a small wrapper module, re-exports that wrapper with ``torch.export`` and runs
``sigec.compile`` on it, so there is one IR and one set of passes. The returned callable feeds
the user tensors to the engine: the first call for a slot records, later calls run
incrementally from the input difference.

Options go through ``torch.compile(..., options={...})`` or ``sigec.backend(**options)``; they
are the keyword arguments of ``sigec.compile``. If the pipeline fails on a graph, the backend
warns once with the reason and runs that graph unchanged, so a result is never wrong.
"""
from __future__ import annotations

import inspect
import logging
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx.traceback as fx_traceback
from torch.fx import GraphModule

from sigec.api import compile as sigec_compile

log = logging.getLogger("sigec.backend")


def _compile_options() -> tuple[str, ...]:
    params = inspect.signature(sigec_compile).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def validate_options(options: Optional[dict]) -> dict:
    """The options as ``sigec.compile`` keyword arguments; unknown names raise ``ValueError``."""
    options = dict(options or {})
    valid = _compile_options()
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"sigec backend: unknown option(s) {unknown}; valid options are {list(valid)}")
    return options


def _is_state(node, example) -> bool:
    """A graph input that is module state (a parameter or buffer) rather than a call argument."""
    if isinstance(example, torch.nn.Parameter):
        return True
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    name = getattr(source, "name", "")
    name = name() if callable(name) else str(name)  # a method in older torch, a property in newer
    return "_parameters" in name or "_buffers" in name


class _BoundGraph(torch.nn.Module):
    """A dynamo graph with its parameters and buffers held as attributes again."""

    def __init__(self, gm: GraphModule, state: dict[int, torch.Tensor], num_inputs: int):
        super().__init__()
        self.graph_module = gm
        self._positions = []  # for each graph input: ("arg", k) or ("state", attribute name)
        k = 0
        for i in range(num_inputs):
            if i in state:
                name = f"state_{i}"
                value = state[i]
                if isinstance(value, torch.nn.Parameter):
                    self.register_parameter(name, value)
                else:
                    self.register_buffer(name, value)
                self._positions.append(("state", name))
            else:
                self._positions.append(("arg", k))
                k += 1

    def forward(self, *args):
        inputs = [args[ref] if kind == "arg" else getattr(self, ref) for kind, ref in self._positions]
        # node by node, keeping dynamo's node meta: a re-export then still knows each op's module
        # (nn_module_stack), which temporal cuts are named by
        with fx_traceback.preserve_node_meta():
            return torch.fx.Interpreter(self.graph_module).run(*inputs)


def sigec_backend(gm: GraphModule, example_inputs: Sequence[Any], options: Optional[dict] = None) -> Callable:
    """Dynamo backend entry point (registered as ``"sigec"`` through ``torch_dynamo_backends``)."""
    kwargs = validate_options(options)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    try:
        if len(placeholders) != len(example_inputs):
            raise RuntimeError(f"graph has {len(placeholders)} inputs but {len(example_inputs)} examples")
        if any(not isinstance(e, torch.Tensor) for e in example_inputs):
            raise RuntimeError("the graph takes symbolic sizes or non-tensor inputs (dynamic shapes); "
                               "use torch.compile(..., dynamic=False)")
        state = {i: e for i, (n, e) in enumerate(zip(placeholders, example_inputs)) if _is_state(n, e)}
        user = [i for i in range(len(example_inputs)) if i not in state]
        bound = _BoundGraph(gm, state, len(example_inputs)).eval()
        engine = sigec_compile(bound, tuple(example_inputs[i] for i in user), **kwargs)
    except Exception as exc:  # any failure of the pipeline: run the graph as dynamo gave it
        warnings.warn(f"sigec backend: running this graph unchanged, the sigec pipeline failed: "
                      f"{type(exc).__name__}: {exc}", stacklevel=2)
        return gm.forward
    log.debug("sigec backend compiled a graph with %d user inputs and %d state tensors", len(user), len(state))

    def run(*args):
        return engine(*[args[i] for i in user])

    run.engine = engine  # for inspection: report(), slots, commit()
    return run


def backend(**options) -> Callable:
    """A backend with options bound: ``torch.compile(model, backend=sigec.backend(policy="exact"))``."""
    kwargs = validate_options(options)

    def compiler(gm: GraphModule, example_inputs: Sequence[Any]) -> Callable:
        return sigec_backend(gm, example_inputs, kwargs)

    return compiler
