"""Schedule a tiled execution: which values run whole, the synchronization phases, what is held.

Writes ``SCHEDULE`` (a ``TileSchedule``) on every node and ``ctx.plan`` (a ``TilePlan``: the
per-tile programs of every phase and the memory and cost estimates). Reads ``SPATIAL`` and
``TILE`` (classify_tiling).

The algorithm, in order:

1. **Whole resolutions.** A resolution whose largest value is at most ``whole_below_bytes``
   (default: the largest value of the model divided by the number of tiles, or by at most 16
   with preview statistics, which are least accurate at low resolutions) runs untiled:
   tiles there would be smaller than one tile's share of memory and pay only overhead. GLOBAL
   values (attention, reductions over space) also run whole; every other value is *tiled*.
   A tiled value whose op has no tiling rule is an error that names every such op.
2. **Phases.** A tiled norm needs its input's statistics over the whole image, so it runs one
   phase after its input; a whole value needs its tiled inputs complete, so it runs at the start
   of the phase after them. Within a phase every tile runs independently.
3. **Programs.** For each phase and tile, the regions are propagated backward from the phase's
   targets (the owned region of: norm inputs whose statistics this phase sums, values later
   phases read, model outputs) through each op's window (``TileRule.geometry``). A value of an
   earlier phase is read from its *held* copy, or recomputed from its own inputs when the
   planner dropped it. Phases are built last to first, so each phase knows what later ones read.
4. **Holding versus recomputing.** Starting from holding everything later phases read, the
   planner drops, one at a time, the held value live at the estimated peak whose recomputation
   costs least per byte saved (values whose recomputation is a copy of no larger inputs, such as
   an up-sampling, are always dropped). With a budget it stops at the first plan under it;
   without one it keeps the plan with the smallest (estimated time x estimated peak). Held values
   are stored in row bands and freed band by band after their last reader, so a value read for
   the last time shrinks while the next one is written.
5. **Halos.** A tile smaller than the halo it needs is an error at the largest tiled resolution;
   a lower resolution where that happens runs whole instead, and the plan says why.
"""
from __future__ import annotations

import heapq
import logging
from typing import Optional

from torch.fx import GraphModule, Node

from sigec.ir import meta_keys as K
from sigec.ir.macs import macs_per_output_pixel
from sigec.passes.pass_base import sigec_pass
from sigec.passes.tile_geometry import Role, TileKind, area
from sigec.passes.tile_plan import (BANDS_PER_TILE_ROW, PREVIEW_WHOLE_SHARES, Step, TileGrid, TilePlan, TileProgram,
                                    TileSchedule, TilingContext, TilingError, bands, clip_region, compute_cost,
                                    halo_violation, is_empty, leaves, per_pixel_bytes, reference_output,
                                    resolution, union_region, value_bytes, wants_of)

log = logging.getLogger("sigec.tiling")


# ---------------------------------------------------------------------------------------------
# step 1 and 2: modes and phases


def _modes(gm: GraphModule, ctx: TilingContext, promoted: dict) -> dict:
    """``node -> (mode, reason)``; ``promoted`` maps resolutions made whole for their halos to why."""
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    by_res: dict = {}
    for n in nodes:
        res = resolution(n)
        if res is not None and n.meta[K.SPATIAL].tainted:
            by_res[res] = max(by_res.get(res, 0), value_bytes(n))
    threshold = ctx.whole_below_bytes
    if threshold is None:
        shares = ctx.grid.n_tiles
        if ctx.norm_stats == "preview":
            # whole resolutions keep exact statistics, and the preview's statistics drift most at
            # low resolutions: finer grids do not push those into tiles
            shares = min(shares, PREVIEW_WHOLE_SHARES)
        threshold = max(by_res.values(), default=0) // shares
    whole_res = {res for res, b in by_res.items() if b <= threshold}
    modes, untileable = {}, []
    for n in nodes:
        rule = n.meta[K.TILE]
        res = resolution(n)
        if rule.kind is TileKind.SOURCE:
            modes[n] = ("source", "")
        elif rule.kind is TileKind.IGNORED:
            modes[n] = ("ignored", "")
        elif rule.kind is TileKind.GLOBAL:
            modes[n] = ("whole", rule.reason)
        elif res in promoted and rule.kind is not TileKind.UNTILEABLE:
            modes[n] = ("whole", promoted[res])
        elif res in whole_res:
            modes[n] = ("whole", f"{res[0]}x{res[1]} runs untiled: its largest value ({by_res[res] / 2**20:.1f} MiB) "
                                 f"is within one tile's share ({threshold / 2**20:.1f} MiB)")
        elif rule.kind is TileKind.UNTILEABLE:
            untileable.append(n)
            modes[n] = ("whole", rule.reason)
        else:
            modes[n] = ("tiled", "")
    if untileable:
        listed = "; ".join(f"{n.name} ({n.target}): {n.meta[K.TILE].reason}" for n in untileable[:12])
        more = f" (+{len(untileable) - 12} more)" if len(untileable) > 12 else ""
        raise TilingError(f"{len(untileable)} op(s) cannot be tiled: {listed}{more}. Run the model untiled, replace "
                          "the op, or add a rule to passes/classify_tiling.py")
    ctx.whole_resolutions = {res: res in whole_res or res in promoted for res in by_res}
    ctx.whole_threshold = threshold
    ctx.resolution_bytes = by_res
    return modes


def _phases(gm: GraphModule, modes: dict, preview: bool) -> dict:
    phase: dict = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        mode = modes[n][0]
        if mode in ("source", "ignored"):
            phase[n] = 0
            continue
        ins = [u for u in n.all_input_nodes if modes[u][0] != "ignored"]
        if mode == "whole":
            phase[n] = max((phase[u] + (modes[u][0] == "tiled") for u in ins), default=0)
            continue
        rule = n.meta[K.TILE]
        p = max((phase[u] for u in ins), default=0)
        if rule.kind is TileKind.NORM and not preview and modes[n.args[0]][0] == "tiled":
            p = max(p, phase[n.args[0]] + 1)  # statistics of the input over every tile first
        phase[n] = p
    return phase


# ---------------------------------------------------------------------------------------------
# step 3: programs


def _build_program(p: int, tile, targets: dict, grid: TileGrid, sched: dict, dropped: set, index: dict,
                   held_reads: set, hold_dtype) -> Optional[TileProgram]:
    """The program of phase ``p`` for ``tile``: ``targets`` maps node -> purposes (``stats`` norms,
    ``held``, ``outputs`` indices)."""
    need: dict = {}
    heap: list = []
    for v in targets:
        owned = grid.owned(resolution(v), tile)
        if is_empty(owned):
            continue
        need[v] = owned
        heapq.heappush(heap, (-index[v], v.name, v))
    actions: dict = {}
    seen = set()
    while heap:
        _, _, n = heapq.heappop(heap)
        if n in seen:
            continue
        seen.add(n)
        mode, phase = sched[n]
        region = need[n]
        if mode in ("source", "whole"):
            actions[n] = "read"
            continue
        if phase < p and n not in dropped:
            actions[n] = "held"
            held_reads.add(n)
            continue
        actions[n] = "compute"
        rule = n.meta[K.TILE]
        image_ops = [u for u, role in zip(n.all_input_nodes, rule.roles) if role is Role.IMAGE]
        for u, want in zip(image_ops, wants_of(n, region)):
            clipped = clip_region(want, resolution(u))
            if is_empty(clipped):
                continue
            need[u] = union_region(need.get(u), clipped)
            heapq.heappush(heap, (-index[u], u.name, u))
    if not actions:
        return None
    order = sorted(actions, key=index.__getitem__)
    last_use: dict = {}
    for n in order:
        if actions[n] == "compute":
            rule = n.meta[K.TILE]
            for u, role in zip(n.all_input_nodes, rule.roles):
                if role is Role.IMAGE and u in actions:
                    last_use[u] = n
    frees: dict = {}
    for u in order:
        frees.setdefault(last_use.get(u, u), []).append(u)
    steps, macs, live, peak = [], 0.0, 0.0, 0.0
    live_bytes: dict = {}
    for n in order:
        region = need[n]
        purposes = targets.get(n, {})
        owned = grid.owned(resolution(n), tile)
        step = Step(n, actions[n], region, stats=tuple(purposes.get("stats", ())),
                    write_held=bool(purposes.get("held")), outputs=tuple(purposes.get("outputs", ())),
                    owned=owned)
        pixels = area(region)
        out_bytes, transient = 0.0, 0.0
        if step.action == "compute":
            step.wants = wants_of(n, region)
            macs += compute_cost(n, pixels)
            out_bytes = per_pixel_bytes(n) * pixels
            rule = n.meta[K.TILE]
            if rule.kind in (TileKind.WINDOW, TileKind.NORM):
                image_ops = [u for u, role in zip(n.all_input_nodes, rule.roles) if role is Role.IMAGE]
                transient = sum(per_pixel_bytes(u) * area(w) for u, w in zip(image_ops, step.wants))
        elif step.action == "held":
            out_bytes = per_pixel_bytes(n) * pixels  # gathered from its bands in the compute dtype
        live += out_bytes
        live_bytes[n] = out_bytes
        peak = max(peak, live + transient)
        step.free_after = tuple(frees.get(n, ()))
        for u in step.free_after:
            live -= live_bytes.pop(u, 0.0)
        steps.append(step)
    return TileProgram(p, tile, steps, macs, int(peak))


def _middle_tile(grid: TileGrid) -> tuple[int, int]:
    return grid.shape[0] // 2, grid.shape[1] // 2


def _evaluate(gm: GraphModule, ctx: TilingContext, sched: dict, dropped: set, forced: set,
              stats_of: dict, outputs: list, representative: bool) -> TilePlan:
    """Build every phase's programs (last to first) and estimate time and peak memory."""
    grid = ctx.grid
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    index = {n: i for i, n in enumerate(nodes)}
    phases = 1 + max((p for _, p in sched.values()), default=0)
    tiles = [_middle_tile(grid)] if representative else grid.tiles()
    scale = grid.n_tiles / len(tiles)
    write: dict = {p: set() for p in range(phases)}
    for v in forced:
        write[sched[v][1]].add(v)
    out_of: dict = {}
    for i, v in enumerate(outputs):
        if v is not None and sched[v][0] == "tiled":
            out_of.setdefault(v, []).append(i)
    read_phases: dict = {}  # held value -> phases reading it
    programs: dict = {}
    held: set = set(forced)
    for p in reversed(range(phases)):
        targets: dict = {}
        for x, norms in stats_of.items():
            if sched[x][1] == p:
                targets.setdefault(x, {})["stats"] = norms
        for v in write[p]:
            targets.setdefault(v, {})["held"] = True
        for v, idx in out_of.items():
            if sched[v][1] == p:
                targets.setdefault(v, {})["outputs"] = idx
        programs[p] = []
        if not targets:
            continue
        for tile in tiles:
            reads: set = set()
            prog = _build_program(p, tile, targets, grid, sched, dropped, index, reads, ctx.hold_dtype)
            if prog is not None:
                programs[p].append(prog)
            for u in reads:
                read_phases.setdefault(u, set()).add(p)
                if u not in write[sched[u][1]]:
                    write[sched[u][1]].add(u)
                    held.add(u)
                    if sched[u][1] == p:
                        raise AssertionError(f"{u.name} read held in its own phase")
    # lifetimes on a clock where phase p's whole step is at p and its tile step at p + 0.5
    whole_nodes = {p: [n for n in nodes if sched[n] == ("whole", p)] for p in range(phases)}
    last: dict = {}
    for u, ps in read_phases.items():  # held values read by tile programs
        last[u] = max(ps) + 0.5
    for p, ns in whole_nodes.items():
        for n in ns:
            for u in n.all_input_nodes:
                if sched[u][0] in ("tiled", "whole"):
                    last[u] = max(last.get(u, 0.0), float(p))
    for p, progs in programs.items():
        for prog in progs:
            for step in prog.steps:
                if step.action == "read" and sched[step.node][0] == "whole":
                    last[step.node] = max(last.get(step.node, 0.0), p + 0.5)
    born: dict = {}
    size: dict = {}
    for v in held:
        born[v], size[v] = sched[v][1] + 0.5, value_bytes(v, ctx.hold_dtype)
    for ns in whole_nodes.values():
        for v in ns:
            born[v], size[v] = float(sched[v][1]), value_bytes(v)
    for i, v in enumerate(outputs):
        if v is not None and sched[v][0] in ("tiled", "whole"):
            born.setdefault(v, sched[v][1] + (0.5 if sched[v][0] == "tiled" else 0.0))
            size.setdefault(v, value_bytes(v))
            last[v] = float("inf")
    kept = {o for o in outputs if o is not None}
    phase_bytes: dict = {}
    phase_total: dict = {}
    whole_free: dict = {}
    peak, peak_phase = 0, 0
    for p in range(phases):
        # the whole step: earlier values still needed, plus this step's own, freed after their last use
        base = sum(size[v] for v in born if born[v] < p <= last.get(v, born[v]))
        live, step_peak = 0, 0
        last_in_step = {u: n for n in whole_nodes[p] for u in n.all_input_nodes}
        for n in whole_nodes[p]:
            live += size[n]
            step_peak = max(step_peak, live)
            # values of this step that nothing reads after this node: freed at once
            done = [u for u in n.all_input_nodes + [n]
                    if born.get(u) == p and last_in_step.get(u, n) is n and last.get(u, p) <= p and u not in kept]
            whole_free[n] = tuple(done)
            live -= sum(size[u] for u in done)
        t = p + 0.5
        alive = [v for v in born if born[v] <= t <= last.get(v, born[v])]
        # held values are stored in row bands: those read for the last time shrink as tile rows
        # finish, those written grow with them
        dying = sum(size[v] for v in alive if v in held and last.get(v) == t and born[v] < t)
        growing = sum(size[v] for v in alive if v in held and born[v] == t and v not in kept)
        steady = sum(size[v] for v in alive) - dying - growing
        rows = grid.shape[0]
        stream = max(dying * min(1.0, (rows - r) / rows + 1 / (rows * BANDS_PER_TILE_ROW)) + growing * (r + 1) / rows
                     for r in range(rows))
        tile_base = int(steady + stream)
        work = max((prog.peak_bytes for prog in programs.get(p, [])), default=0)
        phase_bytes[p] = (tile_base, work)
        phase_total[p] = max(base + step_peak, tile_base + work)
        if phase_total[p] > peak:
            peak, peak_phase = phase_total[p], p
    read_phases = {v: {int(t)} for v, t in last.items() if t != float("inf")}
    hold_bytes = {v: size[v] for v in held}
    macs = scale * sum(prog.macs for progs in programs.values() for prog in progs)
    macs += sum(compute_cost(n, resolution(n)[0] * resolution(n)[1]) if resolution(n) else 0.0
                for ns in whole_nodes.values() for n in ns)
    band_frees = {} if representative else _band_frees(programs, held, last, grid, sched)
    release: dict = {}
    for v in set(held) | {n for ns in whole_nodes.values() for n in ns}:
        if v not in kept:
            release.setdefault(max(read_phases.get(v, {sched[v][1]})), []).append(v)
    return TilePlan(phases, programs, whole_nodes, {}, held, set(dropped), set(forced), outputs, int(peak),
                    macs, peak_phase, phase_bytes, hold_bytes, ctx.hold_dtype, release=release,
                    phase_total=phase_total, whole_free=whole_free, band_frees=band_frees)


def _band_frees(programs: dict, held: set, last: dict, grid: TileGrid, sched: dict) -> dict:
    """After which program of its last reading phase each band of a held value can go."""
    frees: dict = {}
    for v in held:
        t = last.get(v)
        if t is None or t == float("inf") or t != int(t) + 0.5:
            continue  # last read by a whole node (or never): freed with the phase
        p = int(t)
        last_reader: dict = {}
        layout = bands(grid, resolution(v))
        for index, prog in enumerate(programs.get(p, [])):
            for step in prog.steps:
                if step.node is v and step.action == "held":
                    (r0, r1), _ = step.region
                    for k, (lo, hi) in enumerate(layout):
                        if lo < r1 and r0 < hi:
                            last_reader[k] = index
        for k, index in last_reader.items():
            frees.setdefault((p, index), []).append((v, k))
    return frees


def _recompute_is_free(v: Node) -> bool:
    """An op without multiply-accumulates (pointwise, norm, gather) of image inputs no larger than
    its output: holding its inputs instead costs no more memory, and recomputing it almost no time
    (an up-sampling, an activation after a norm)."""
    rule = v.meta[K.TILE]
    if rule.kind not in (TileKind.POINTWISE, TileKind.GATHER, TileKind.NORM) or macs_per_output_pixel(v) > 0:
        return False
    images = [u for u, role in zip(v.all_input_nodes, rule.roles) if role is Role.IMAGE]
    return bool(images) and sum(value_bytes(u) for u in images) <= value_bytes(v)


def _evaluate_dropping(gm, ctx, sched, dropped: set, forced, stats_of, outputs) -> tuple[set, TilePlan]:
    """``_evaluate`` after also dropping every held value whose recomputation is free."""
    dropped = set(dropped)
    while True:
        plan = _evaluate(gm, ctx, sched, dropped, forced, stats_of, outputs, representative=True)
        free = {v for v in plan.held - forced - dropped if _recompute_is_free(v)}
        if not free:
            return dropped, plan
        dropped |= free


def _choose_holds(gm, ctx: TilingContext, sched, forced, stats_of, outputs) -> tuple[set, str, list]:
    """Greedy hold-versus-recompute (module docstring, step 4); returns the dropped set."""
    dropped, current = _evaluate_dropping(gm, ctx, sched, set(), forced, stats_of, outputs)
    path = [(set(dropped), current.estimated_macs, current.estimated_peak_bytes)]
    budget = ctx.budget_bytes
    if budget is not None and ctx.on_full == "raise":
        if current.estimated_peak_bytes > budget:
            raise TilingError(f"holding every value later phases read needs an estimated "
                              f"{current.estimated_peak_bytes / 2**20:.0f} MiB, over the budget of "
                              f"{budget / 2**20:.0f} MiB; raise the budget, use more tiles, or allow "
                              "recomputation with on_cache_full='evict'")
        return dropped, "hold every value later phases read, recomputing only copies (on_cache_full='raise')", path
    while budget is None or current.estimated_peak_bytes > budget:
        p = current.peak_phase
        live = [v for v in current.held - forced
                if sched[v][1] <= p and any(p <= q for q in _readers(current, v))]
        best = None
        for v in sorted(live, key=lambda n: n.name):
            trial_dropped, trial = _evaluate_dropping(gm, ctx, sched, dropped | {v}, forced, stats_of, outputs)
            # several phases may share the peak: a drop that lowers this phase without raising the
            # peak is progress
            saved = current.phase_total[p] - trial.phase_total[p]
            if saved <= 0 or trial.estimated_peak_bytes > current.estimated_peak_bytes:
                continue
            ratio = max(0.0, trial.estimated_macs - current.estimated_macs) / saved
            if best is None or ratio < best[0]:
                best = (ratio, trial_dropped, trial)
        if best is None:
            break
        dropped = best[1]
        current = best[2]
        path.append((set(dropped), current.estimated_macs, current.estimated_peak_bytes))
    if budget is not None:
        fitting = [entry for entry in path if entry[2] <= budget]
        if not fitting:
            low = min(entry[2] for entry in path)
            raise TilingError(f"no plan fits the budget of {budget / 2**20:.0f} MiB: the lowest estimated peak "
                              f"with recomputation is {low / 2**20:.0f} MiB; use more tiles or a larger budget")
        chosen = fitting[0]
        why = f"fastest plan within the budget of {budget / 2**20:.0f} MiB"
    else:
        chosen = min(path, key=lambda e: e[1] * e[2])
        why = "the plan with the smallest estimated time x peak memory"
    limit = chosen[2] if budget is None else budget
    dropped = _hold_again(gm, ctx, sched, forced, stats_of, outputs, chosen[0], limit)
    if dropped != chosen[0]:
        plan = _evaluate(gm, ctx, sched, dropped, forced, stats_of, outputs, representative=True)
        path.append((set(dropped), plan.estimated_macs, plan.estimated_peak_bytes))
    return dropped, why, path


def _hold_again(gm, ctx, sched, forced, stats_of, outputs, dropped: set, peak: int) -> set:
    """The greedy drops a value live at the peak of its time; a later drop in another phase can
    lower the peak below what that earlier drop was for. Hold such values again, most expensive
    recomputation first, as long as the estimated peak stays at most ``peak`` (the chosen plan's,
    or the budget)."""
    base = _evaluate(gm, ctx, sched, dropped, forced, stats_of, outputs, representative=True).estimated_macs
    saving = {}
    for v in dropped:
        if _recompute_is_free(v):
            continue
        trial = _evaluate(gm, ctx, sched, dropped - {v}, forced, stats_of, outputs, representative=True)
        if trial.estimated_macs < base:
            saving[v] = base - trial.estimated_macs
    for v in sorted(saving, key=lambda n: (-saving[n], n.name)):
        trial = _evaluate(gm, ctx, sched, dropped - {v}, forced, stats_of, outputs, representative=True)
        if trial.estimated_peak_bytes <= peak:
            dropped = dropped - {v}
    return dropped


def _readers(plan: TilePlan, v: Node) -> set:
    phases = set()
    for p, progs in plan.programs.items():
        for prog in progs:
            if any(s.node is v and s.action == "held" for s in prog.steps):
                phases.add(p)
    for p, ns in plan.whole.items():
        if any(v in n.all_input_nodes for n in ns):
            phases.add(p)
    return phases


@sigec_pass(requires=(K.SPATIAL, K.TILE), provides=(K.SCHEDULE,))
def schedule_tiles(gm: GraphModule, ctx: TilingContext) -> GraphModule:
    ctx.grid = TileGrid.split(reference_output(gm), ctx.tiles, ctx.tile_size)
    promoted: dict = {}
    while True:
        modes, phase, plan = _schedule(gm, ctx, promoted)
        violation = halo_violation(plan, ctx.grid)
        if violation is None:
            break
        node, res, size, halo, what = violation
        tiled = [r for r, whole in ctx.whole_resolutions.items() if not whole]
        top = max(ctx.resolution_bytes[r] for r in tiled)
        message = (f"a tile is {size} px {what} at {res[0]}x{res[1]} (node {node.name}, {node.target}), smaller than "
                   f"the halo of {halo} px it needs there; use fewer tiles (the grid is {ctx.grid.shape[0]}x"
                   f"{ctx.grid.shape[1]} on the {ctx.grid.output[0]}x{ctx.grid.output[1]} output)")
        if ctx.whole_below_bytes == 0 or ctx.resolution_bytes[res] >= top:
            raise TilingError(message)
        # a lower resolution whose tiles are smaller than their halo runs whole instead
        promoted[res] = (f"{res[0]}x{res[1]} runs untiled: its {size}-px tiles are smaller than the {halo}-px halo "
                         "they need")
        log.info("%s", promoted[res])
    for n, (mode, reason) in modes.items():
        n.meta[K.SCHEDULE] = TileSchedule(mode, phase[n], n in plan.held, reason)
    ctx.plan = plan
    return gm


def _schedule(gm: GraphModule, ctx: TilingContext, promoted: dict):
    preview = ctx.norm_stats == "preview"
    modes = _modes(gm, ctx, promoted)
    phase = _phases(gm, modes, preview)
    sched = {n: (modes[n][0], phase[n]) for n in modes}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = [a if isinstance(a, Node) else None for a in leaves(output.args[0])]
    # values whole nodes read must be complete: held
    forced = {u for n in modes if modes[n][0] == "whole" for u in n.all_input_nodes if modes[u][0] == "tiled"}
    stats_of: dict = {}
    if not preview:
        for n in modes:
            if modes[n][0] == "tiled" and n.meta[K.TILE].kind is TileKind.NORM and modes[n.args[0]][0] == "tiled":
                stats_of.setdefault(n.args[0], []).append(n)
    dropped, why, path = _choose_holds(gm, ctx, sched, forced, stats_of, outputs)
    plan = _evaluate(gm, ctx, sched, dropped, forced, stats_of, outputs, representative=False)
    plan.stats_of = stats_of
    plan.choice = why
    plan.path = [(len(d), macs, peak) for d, macs, peak in path]
    return modes, phase, plan
