"""``engine.report()``: per-node decision, mask fraction, block geometry and MACs; kernel launches
per plan and the CUDA graphs held."""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch

from sigec.core.launches import LaunchCount, count_launches
from sigec.ir import meta_keys as K
from sigec.ir.macs import macs_per_output_pixel, node_macs
from sigec.passes.op_table import OpKind
from sigec.ir.plan import DecisionKind
from sigec.runtime import masks as M

log = logging.getLogger("sigec.core.report")


@dataclasses.dataclass
class NodeReport:
    name: str
    op: str
    resolution: Optional[tuple[int, int]]
    decision: str
    reason: str
    mask: str
    mask_fraction: Optional[float]
    block: Optional[tuple[int, int]]
    halo: Optional[tuple[int, int]]
    active_blocks: Optional[int]
    dense_macs: int
    incremental_macs: Optional[int]
    approximation: str
    #: the cost model's ``(sparse, dense)`` estimate in seconds for the planned edit, where it priced the op
    estimate: Optional[tuple[float, float]] = None


@dataclasses.dataclass
class Report:
    nodes: list[NodeReport]
    policy: str
    input_mask_fraction: Optional[float]
    #: the edit area the plan that runs this mask was made for, and every planned area
    planned_fraction: Optional[float] = None
    planned_fractions: tuple = ()
    #: the kernel costs the cost model priced sparse against dense with
    kernel_costs: str = ""
    #: kernel launches of one incremental call of each plan, by planned edit area (``sigec.core.launches``;
    #: a string says why a plan's could not be counted)
    launches: dict = dataclasses.field(default_factory=dict)
    #: CUDA graphs held by each plan's runner (``sigec.core.cuda_graphs.CaptureRecord``), by planned edit area
    captures: dict = dataclasses.field(default_factory=dict)

    @property
    def dense_macs(self) -> int:
        return sum(n.dense_macs for n in self.nodes)

    @property
    def incremental_macs(self) -> Optional[int]:
        if any(n.incremental_macs is None for n in self.nodes):
            return None
        return sum(n.incremental_macs for n in self.nodes)

    def fallbacks(self) -> dict[str, str]:
        return {n.name: n.reason for n in self.nodes if n.decision == DecisionKind.FALLBACK.value}

    def __str__(self) -> str:
        head = (f"{'node':40s} {'op':28s} {'res':>9s} {'decision':9s} {'mask':>6s} {'blocks':>6s} {'dense MACs':>12s} "
                f"{'incr MACs':>12s} {'est. sparse/dense ms':>21s}")
        lines = [head, "-" * len(head)]
        for n in self.nodes:
            if n.decision == DecisionKind.STATIC.value and not n.dense_macs:
                continue
            res = f"{n.resolution[0]}x{n.resolution[1]}" if n.resolution else "-"
            frac = f"{n.mask_fraction:.1%}" if n.mask_fraction is not None else "-"
            nb = str(n.active_blocks) if n.active_blocks is not None else "-"
            inc = f"{n.incremental_macs:,}" if n.incremental_macs is not None else "-"
            est = f"{n.estimate[0] * 1e3:.3g} / {n.estimate[1] * 1e3:.3g}" if n.estimate is not None else "-"
            lines.append(f"{n.name[:40]:40s} {n.op[:28]:28s} {res:>9s} {n.decision:9s} {frac:>6s} {nb:>6s} "
                         f"{n.dense_macs:>12,} {inc:>12s} {est:>21s}")
        inc = self.incremental_macs
        ratio = f"{self.dense_macs / inc:.2f}x" if inc else "-"
        lines.append(f"total: dense {self.dense_macs:,} MACs, incremental "
                     f"{inc if inc is None else format(inc, ',')} MACs ({ratio} fewer), policy {self.policy}")
        if self.planned_fraction is not None:
            plans = ", ".join(f"{f:.1%}" for f in self.planned_fractions)
            lines.append(f"plan: made for a {self.planned_fraction:.1%} edit (plans for {plans}; each call runs "
                         "the one nearest its edit area)")
        if self.kernel_costs:
            lines.append(f"kernel costs: {self.kernel_costs}")
        for fraction, count in self.launches.items():
            mark = " (this edit's plan)" if fraction == self.planned_fraction else ""
            text = count.describe() if isinstance(count, LaunchCount) else f"not counted ({count})"
            lines.append(f"launches per call, plan {fraction:.1%}{mark}: {text}")
        for fraction, records in self.captures.items():
            if records:
                lines.append(f"CUDA graphs, plan {fraction:.1%}: " + "; ".join(r.describe() for r in records))
        fb = self.fallbacks()
        if fb:
            lines.append(f"fallbacks ({len(fb)}): " + "; ".join(f"{k}: {v}" for k, v in list(fb.items())[:10]))
        return "\n".join(lines)


def _incremental_macs(node, stats) -> tuple[Optional[int], Optional[int], Optional[float]]:
    decision = node.meta[K.DECISION].kind
    dense = node_macs(node)
    mask = node.meta.get(K.MASK)
    if stats is None:
        return None, None, None
    frac = M.pixel_fraction(stats["masks"], mask) if mask is not None and mask in stats["masks"] else None
    if decision is not DecisionKind.SPARSE or node.meta[K.GRID] is None:
        return dense, None, frac
    block = node.meta[K.GRID]
    blocks = stats["blocks"].get((mask, tuple(block)))  # reduced already when the graph reads it
    count = int((blocks if blocks is not None else M.active_blocks(stats["masks"][mask], block)).shape[0])
    return int(round(count * block[0] * block[1] * macs_per_output_pixel(node))), count, frac


def build_report(engine, stats: Optional[dict]) -> Report:
    ctx = engine.context
    # static values the incremental graph reads from the slot (and what only they need) cost nothing
    emitted = {n.meta.get(K.ORIGIN) for n in engine.incremental.graph.nodes}
    rows = []
    for node in engine.graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        decision = node.meta[K.DECISION]
        rule = node.meta.get(K.RULE)
        if rule is not None and rule.kind is OpKind.IGNORED:
            continue
        spec = node.meta.get(K.WINDOW)
        inc, count, frac = _incremental_macs(node, stats)
        if decision.kind is DecisionKind.STATIC and node.name not in emitted and inc is not None:
            inc = 0
        mask = node.meta.get(K.MASK)
        rows.append(NodeReport(
            name=node.name, op=str(node.target), resolution=node.meta[K.SPATIAL].resolution,
            decision=decision.kind.value, reason=decision.reason,
            mask=M.describe(mask) if mask is not None else "-", mask_fraction=frac,
            block=node.meta.get(K.GRID), halo=spec.halo if spec is not None else None,
            active_blocks=count, dense_macs=node_macs(node), incremental_macs=inc,
            approximation=ctx.approximations.get(node.name, ""), estimate=decision.estimate))
    input_frac = float(stats["input_mask"].float().mean()) if stats is not None else None
    costs = ctx.kernel_costs.summary() if ctx.kernel_costs is not None else ""
    launches = {p.planned_fraction: _launches(p) for p in engine.plans}
    captures = {p.planned_fraction: p.incremental.capture_records(_slot_names(engine))
                for p in engine.plans if hasattr(p.incremental, "capture_records")}
    return Report(rows, ctx.settings.policy, input_frac, ctx.settings.planned_fractions[0],
                  tuple(p.planned_fraction for p in engine.plans), costs, launches, captures)


def _launches(plan) -> "LaunchCount | str":
    """The plan's launch count, or why it could not be read (the rest of the report stands)."""
    try:
        return count_launches(plan)
    except Exception as exc:  # an op without a meta kernel, for example
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        log.warning("kernel launches of plan %.3g not counted: %s", plan.planned_fraction, reason)
        return reason


def _slot_names(engine) -> dict:
    """Data pointer of each recorded slot's first cached tensor -> the slot's name, so capture
    records (keyed by their caches' addresses) name their slot."""
    names = {}
    for key, slot in engine.store.items():
        for cache in slot.caches:
            if isinstance(cache, torch.Tensor):
                names[cache.data_ptr()] = key[1]
    return names
