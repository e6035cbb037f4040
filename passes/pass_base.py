"""Pass protocol, context and pipeline runner.

A pass is ``fn(gm: GraphModule, ctx: PassContext) -> GraphModule`` decorated with ``@sigec_pass``,
which declares the ``node.meta`` keys it needs and the ones it writes. The runner checks those
constraints (so order is validated by names, not list positions), names the failing pass and
the passes before it in any error, and can hand the graph to an observer after each pass
(``sigec dump --after PASS``).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from torch.fx import GraphModule

from sigec.ir.settings import CompileSettings

if TYPE_CHECKING:
    from sigec.ir.costs import KernelCosts

log = logging.getLogger("sigec.passes")


@dataclasses.dataclass
class PassContext:
    """What passes share besides the graph.

    Attributes:
        settings: the user's compile settings.
        spatial_inputs: names of the placeholders that are images.
        input_resolution: their common (H, W).
        batch: the batch size of the spatial inputs.
        fallbacks: ``{node name: reason}`` for every node that runs densely as a fallback
            (written by classify_spatial and partition, read by reports).
        approximations: ``{node name: reason}`` for nodes whose incremental result is not the
            dense model's even under ``exact`` (written by propagate_masks).
        kernel_costs: the ``sigec.ir.costs.KernelCosts`` the partition priced its decisions with
            (written by partition, read by reports).
        dense_graph: the analysed graph the incremental graph was emitted from (set before the
            incremental passes; an emitted node's ``sigec.origin`` names its node there).
    """

    settings: CompileSettings
    spatial_inputs: tuple[str, ...] = ()
    input_resolution: tuple[int, int] = (0, 0)
    batch: int = 1
    fallbacks: dict = dataclasses.field(default_factory=dict)
    approximations: dict = dataclasses.field(default_factory=dict)
    kernel_costs: Optional["KernelCosts"] = None
    dense_graph: Optional[GraphModule] = None
    timings: dict = dataclasses.field(default_factory=dict)


PassFn = Callable[[GraphModule, PassContext], GraphModule]


@dataclasses.dataclass(frozen=True)
class PassInfo:
    name: str
    fn: PassFn
    requires: tuple[str, ...]
    provides: tuple[str, ...]


def sigec_pass(requires: Sequence[str] = (), provides: Sequence[str] = ()):
    """Declare a pass's meta-key dependencies; the runner validates the order from them."""
    def wrap(fn: PassFn) -> PassFn:
        fn.sigec_pass = PassInfo(fn.__name__, fn, tuple(requires), tuple(provides))
        return fn
    return wrap


class PassError(RuntimeError):
    """An internal failure of a pass; names the pass and the passes before it."""


class UserInputError(ValueError):
    """A problem with what the user gave (model inputs, settings); passes it through unwrapped."""


def dense_nodes(ctx: PassContext) -> dict:
    """``{name: node}`` of ``ctx.dense_graph``: where an emitted node's ``sigec.origin`` points."""
    return {n.name: n for n in ctx.dense_graph.graph.nodes} if ctx.dense_graph is not None else {}


def finish_rewrite(gm: GraphModule, count: int, what: str) -> GraphModule:
    """End of a rewriting pass: when it changed anything, lint, recompile and log the count."""
    if count:
        gm.graph.lint()
        gm.recompile()
        log.debug("%s: %d", what, count)
    return gm


def check_order(passes: Sequence[PassFn]) -> None:
    """Every key a pass requires is provided by an earlier pass."""
    available: set[str] = set()
    for p in passes:
        info: PassInfo = p.sigec_pass
        missing = [k for k in info.requires if k not in available]
        if missing:
            raise PassError(f"pass {info.name!r} requires {missing}, which no earlier pass provides; "
                            f"order: {[q.sigec_pass.name for q in passes]}")
        available.update(info.provides)


def run_passes(gm: GraphModule, ctx: PassContext, passes: Sequence[PassFn],
               observer: Optional[Callable[[str, GraphModule], None]] = None,
               stop_after: Optional[str] = None) -> GraphModule:
    check_order(passes)
    names = [p.sigec_pass.name for p in passes]
    if stop_after is not None and stop_after not in names:
        raise PassError(f"{stop_after!r} is not a valid pass! Passes: {', '.join(names)}")
    done: list[str] = []
    for p in passes:
        name = p.sigec_pass.name
        start = time.perf_counter()
        try:
            gm = p(gm, ctx)
        except UserInputError:
            raise
        except Exception as exc:
            raise PassError(f"an error occurred when running the {name!r} pass after the following "
                            f"passes: {done}: {exc}") from exc
        ctx.timings[name] = time.perf_counter() - start
        log.debug("pass %s took %.3fs", name, ctx.timings[name])
        done.append(name)
        if observer is not None:
            observer(name, gm)
        if name == stop_after:
            break
    return gm
