"""The incremental engine returned by ``sigec.compile``."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
from itertools import chain
from typing import TYPE_CHECKING, Any, Hashable, Optional

import torch
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from sigec.core import inputs
from sigec.ir import meta_keys as K
from sigec.core.codegen.incremental import VALUE, IncrementalSignature
from sigec.ir.plan import DecisionKind
from sigec.passes.partition import estimated_seconds
from sigec.passes.pass_base import PassContext
from sigec.runtime import masks as M
from sigec.runtime.cache import Slot, SlotStore, fingerprint

if TYPE_CHECKING:
    from sigec.core.report import Report

log = logging.getLogger("sigec")


class EngineError(RuntimeError):
    """Misuse of an engine: editing before recording, wrong mask, wrong input shape, ..."""


def _nchw(t: torch.Tensor, nhwc: bool) -> torch.Tensor:
    """The NCHW view of a cached value (NHWC values are permuted, as the graph does)."""
    return t.permute(0, 3, 1, 2) if nhwc else t


def _writable(t: torch.Tensor, nhwc: bool) -> torch.Tensor:
    """``t`` in a layout ``sigec.scatter_`` writes into: its NCHW view must be NCHW-contiguous or
    channels-last (one copy at record time if the model produced another layout)."""
    view = _nchw(t, nhwc)
    if view.is_contiguous() or view.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def _read_blocks(t: torch.Tensor, indices: torch.Tensor, block: list) -> torch.Tensor:
    """The blocks of the NCHW tensor ``t`` at ``indices`` (a copy)."""
    return torch.ops.sigec.gather(t, indices, block, block, [0, 0], "constant", 0.0, None, None, "none", 0.0)


def _put_back(slot: Slot, entry: tuple) -> None:
    """Write the saved baselines of one ``slot.dirty`` entry back into its cache."""
    pos, indices, block, nhwc, saved = entry
    torch.ops.sigec.scatter_(_nchw(slot.caches[pos], nhwc), saved, indices, block)


def _rebase_working_buffers(slot: Slot, writes: list) -> list:
    """Prepare the slot's in-place caches for a run that writes ``writes`` = ``[(cache position,
    block indices, block, nhwc)]``; return the new ``slot.dirty``.

    Each cache must hold its baseline everywhere the run does not write. Repeating or refining
    an edit over the same blocks moves no data here. Otherwise the blocks the previous
    uncommitted edit dirtied are written back whole and the baselines of this run's blocks are
    read afresh: two native calls per cache. (Restoring only the blocks this run does not cover
    and carrying the others' saved baselines over took about 25 small tensor ops per cache, more
    time than the data they spared.) A plan writes each cache at most once, so positions are
    unique in both lists.
    """
    previous = {entry[0]: entry for entry in slot.dirty or []}
    dirty = []
    # caches on one grid share their index tensors: compare each pair once (on a GPU
    # torch.equal waits for the device, and a UNet has about a hundred caches)
    equal: dict = {}
    for pos, indices, block, nhwc in writes:
        old = previous.pop(pos, None)
        if old is not None and (old[2], old[3]) == (block, nhwc):
            old_indices = old[1]
            pair = (id(old_indices), id(indices))
            if pair not in equal:
                equal[pair] = old_indices is indices or (old_indices.shape == indices.shape
                                                         and torch.equal(old_indices, indices))
            if equal[pair]:
                dirty.append((pos, indices, block, nhwc, old[4]))
                continue
        if old is not None:
            _put_back(slot, old)
        dirty.append((pos, indices, block, nhwc, _read_blocks(_nchw(slot.caches[pos], nhwc), indices, block)))
    for entry in previous.values():  # caches this run does not write
        _put_back(slot, entry)
    return dirty


def _priced_ops(plan: "Plan") -> list:
    """``(node, block-index position, grid cells)`` of each sparse op the partition priced; none
    where a dense run would give another result than the plan (``sige`` masks, or approximations):
    there the edit stays incremental, as the mask promises."""
    positions = {key: i for i, key in enumerate(plan.signature.blocks)}
    priced: list = []
    ctx = plan.context
    if ctx.kernel_costs is None or ctx.settings.policy != "exact" or ctx.approximations:
        return priced
    for node in plan.graph_module.graph.nodes:
        decision, window = node.meta.get(K.DECISION), node.meta.get(K.WINDOW)
        if decision is None or decision.kind is not DecisionKind.SPARSE or decision.estimate is None or window is None:
            continue
        key = (node.meta[K.MASK], window.block)
        if key in positions:
            grid = M.grid_shape(node.meta[K.SPATIAL].resolution, window.block)
            priced.append((node, positions[key], grid[0] * grid[1]))
    return priced


@dataclasses.dataclass
class Plan:
    """One compiled plan: the graph analysed for one planned edit area, and its incremental graph.

    Attributes:
        planned_fraction: the edit area (fraction of the image) the cost model planned for.
        graph_module: the analysed dense graph (``node.meta`` holds this plan's decisions).
        context: the pass context of the analysis.
        incremental: GraphModule ``(*inputs, *cached, *block indices, *pixel masks) ->
            (*outputs, *updated cached values)``.
        signature: positions of the incremental graph's inputs and outputs.
        cache_positions: where each of ``signature.caches`` is in a slot's cache list.
    """

    planned_fraction: float
    graph_module: GraphModule
    context: PassContext
    incremental: GraphModule
    signature: IncrementalSignature
    cache_positions: list = dataclasses.field(default_factory=list)


class Engine(torch.nn.Module):
    """Runs a model incrementally.

    The first call for a cache slot records (a dense run that keeps what later edits need).
    Later calls compare the spatial inputs with the recorded ones and recompute only the affected
    blocks. ``mask=`` (H x W, or N x H x W per sample, boolean) is authoritative instead: only what
    it covers is recomputed, and pixels outside it keep their recorded values even where the input
    changed. Slots are chosen by the values of the non-spatial inputs (for example the timestep)
    or named with ``with engine.slot(name):``.

    Each call runs the plan made for the edit area nearest to its own (``plans``, one per
    ``expected_active_fraction``); all plans read the same slots.

    Attributes:
        plans: the compiled plans, by ascending planned edit area.
        recording: GraphModule ``(*inputs) -> (*outputs, *cached)``, with the caches of every plan
            in the order of ``cache_keys``.
        graph_module, context, incremental, signature: those of the plan the last edit ran (or
            that ``report(mask)`` chose); the first plan before any edit.
    """

    def __init__(self, plans: list[Plan], recording: GraphModule, cache_keys: list, in_spec, out_spec,
                 input_names: list[str], store: SlotStore, source: Optional[torch.nn.Module] = None,
                 on_stale: str = "rerecord", cache_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if on_stale not in ("rerecord", "raise"):
            raise ValueError(f"on_stale must be 'rerecord' or 'raise', got {on_stale!r}")
        self.plans = plans
        self.recording = recording
        self.cache_keys = cache_keys
        self._plan = plans[0]
        for plan in plans:
            plan.cache_positions = [cache_keys.index(key) for key in plan.signature.caches]
        graph_module, ctx = plans[0].graph_module, plans[0].context
        self._in_spec, self._out_spec = in_spec, out_spec
        self.input_names = input_names
        self._spatial_pos = [input_names.index(n) for n in ctx.spatial_inputs]
        self._examples = [n.meta.get("val") for n in graph_module.graph.nodes if n.op == "placeholder"]
        self.store = store
        self._slot_name: Optional[Hashable] = None
        self._pending: Optional[dict] = None
        # (plan, input mask, mask_stats) of the last evaluated mask, reused when it repeats
        self._mask_stats_memo: Optional[tuple] = None
        self.last_stats: Optional[dict] = None
        self.on_stale = on_stale
        self.cache_dtype = cache_dtype
        # the cached activations the plans read in cache_dtype (values of edited nodes only: slot
        # constants and normalization affines are small and used as they are)
        stored = {key for plan in plans for key in plan.signature.stored}
        self._narrowable = {i for i, key in enumerate(cache_keys) if key in stored}
        # per plan, the caches its incremental graph overwrites in place: (slot cache position,
        # block-index position, block size, NHWC); the overwritten blocks are saved before a run
        # and restored before the next
        self._inplace = {id(plan): [(plan.cache_positions[c], b, list(plan.signature.blocks[b][1]), nhwc)
                                    for c, b, nhwc in plan.signature.inplace] for plan in plans}
        # per plan, the slot caches its runs keep up to date (written in place or returned)
        self._maintained = [frozenset([pos for pos, _, _, _ in self._inplace[id(plan)]]
                                      + [cache_keys.index((name, VALUE)) for name in plan.signature.updated])
                            for plan in plans]
        # per plan, the sparse ops the cost model priced, by block-index input: an edit whose
        # blocks make them dearer than dense runs dense (``_cheaper_dense``)
        self._priced = {id(plan): _priced_ops(plan) for plan in plans}
        self._working_buffers = sorted({(pos, nhwc) for entries in self._inplace.values() for pos, _, _, nhwc in entries})
        # (name, tensor, identity) of every parameter and buffer the graphs read; the model's own
        # objects, so in-place updates show up in their version counters.
        self._watched = [(name, t, id(t)) for name, t in
                         chain(graph_module.named_parameters(), graph_module.named_buffers())]
        # where each watched tensor lives in the user's model, to see it replaced by another
        self._owners = inputs.owners(source, [name for name, _, _ in self._watched]) if source is not None else []
        self._lock = threading.RLock()
        self._device = self._watched[0][1].device if self._watched else None
        self._placement = [(t.dtype, t.device) for _, t, _ in self._watched]

    def _apply(self, fn, recurse=True):
        """``engine.to(...)``, ``.half()``, ``.cuda()``...: refused before anything changes.

        The captured graphs have the model's dtype and device written into them (casts, tensor
        factories), so a moved engine would not compute the moved model: compile it again.
        """
        inputs.refuse_move(self._watched[0][1] if getattr(self, "_watched", None) else None, fn, EngineError)
        return super()._apply(fn, recurse)

    # -- plans --------------------------------------------------------------------------------
    @property
    def graph_module(self) -> GraphModule:
        return self._plan.graph_module

    @property
    def context(self) -> PassContext:
        return self._plan.context

    @property
    def incremental(self) -> GraphModule:
        return self._plan.incremental

    @property
    def signature(self) -> IncrementalSignature:
        return self._plan.signature

    def plan_for(self, input_mask: torch.Tensor, slot: Optional[Slot] = None) -> Plan:
        """The plan made for the edit area nearest (in ratio) to ``input_mask``'s, among those
        whose caches in ``slot`` match its baseline."""
        area = max(float(input_mask.float().mean()), 1e-6)
        fresh = [p for i, p in enumerate(self.plans) if slot is None or slot.fresh_plans is None or i in slot.fresh_plans]
        return min(fresh, key=lambda p: abs(math.log(p.planned_fraction / area)))

    # -- slots --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def slot(self, name: Hashable):
        """Use the cache slot ``name`` for the calls inside the block."""
        previous, self._slot_name = self._slot_name, name
        try:
            yield self
        finally:
            self._slot_name = previous

    def clear(self) -> None:
        """Forget every recorded slot."""
        self.store.clear()
        self._pending = None

    # -- staleness ----------------------------------------------------------------------------
    def _state_versions(self) -> tuple:
        return inputs.state_versions(self._watched)

    def _check_identity(self) -> None:
        """Parameters moved or replaced by new objects are not what the graphs compute with."""
        inputs.check_identity(self._watched, self._placement, self._owners, EngineError)

    def _fresh_slot(self, key, slot: Optional[Slot]) -> Optional[Slot]:
        """``slot`` if the weights are unchanged since it was recorded; otherwise apply ``on_stale``."""
        if slot is None or slot.state_versions == self._state_versions():
            return slot
        changed = [name for (name, t, _), old in zip(self._watched, slot.state_versions)
                   if (t.data_ptr(), t._version) != old]
        if self.on_stale == "raise":
            raise EngineError(f"weights changed since slot {key[1]!r} was recorded ({changed[:3]}...): "
                              "clear() the engine to record again, or compile with on_stale='rerecord'")
        log.info("weights changed since recording (%s); dropping every slot and recording again", changed[:3])
        self.store.clear()
        self._pending = None
        return None

    # -- calling ------------------------------------------------------------------------------
    def _flatten(self, args, kwargs) -> list:
        return inputs.flatten_inputs(args, kwargs, self._in_spec, self.input_names, self._examples, self._device,
                                     EngineError)

    def _slot_key(self, flat: list) -> tuple[Hashable, str]:
        others = [v for i, v in enumerate(flat) if i not in self._spatial_pos]
        fp = fingerprint(others)
        return (("named", self._slot_name) if self._slot_name is not None else ("inputs", fp)), fp

    def _input_mask(self, flat: list, slot: Slot, mask: Optional[torch.Tensor]) -> torch.Tensor:
        res = self.context.input_resolution
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise EngineError(f"mask must be a torch.Tensor of shape {res} and dtype bool, got "
                                  f"{type(mask).__name__}")
            if mask.dtype != torch.bool:
                raise EngineError(f"mask must have dtype torch.bool, got {mask.dtype}; use mask > 0.5 "
                                  "or mask.bool()")
            device = flat[self._spatial_pos[0]].device
            if mask.device != device:
                raise EngineError(f"mask is on {mask.device} but the inputs are on {device}; "
                                  f"move it with mask.to({str(device)!r})")
            batch = self.context.batch
            if tuple(mask.shape) == (batch, *res) and batch > 1:
                mask = mask.any(dim=0)  # one mask per sample: their union runs in one batched call
            if tuple(mask.shape) != tuple(res):
                raise EngineError(f"mask has shape {tuple(mask.shape)} but the spatial inputs are "
                                  f"{res[0]}x{res[1]}; pass an H x W boolean mask (or N x H x W, one per sample)")
            return mask
        eps = self.context.settings.eps
        out = None
        for pos, old in zip(self._spatial_pos, slot.spatial_inputs):
            # "not <= eps" also flags NaN and Inf differences as edited (NaN > eps is False)
            hw = tuple(old.shape[-2:])
            diff = M.difference_mask(flat[pos], old, eps, hw)
            if hw != tuple(res):  # a smaller spatial input: each of its pixels covers a block of the mask
                diff = diff.repeat_interleave(res[0] // hw[0], 0).repeat_interleave(res[1] // hw[1], 1)
            out = diff if out is None else out | diff
        return out

    def mask_stats(self, input_mask: torch.Tensor, every_node: bool = False) -> dict:
        """Evaluate the plan's masks for an input mask: pixel masks and active block indices.

        Only the masks the incremental graph reads are evaluated unless ``every_node`` (reports).
        """
        if not every_node:
            # a repeated stroke (the same mask again, e.g. an edit being refined or re-run) reuses
            # the masks and block indices of the previous call of the same plan
            last = self._mask_stats_memo
            if last is not None and last[0] is self._plan and last[1].shape == input_mask.shape \
                    and last[1].device == input_mask.device and torch.equal(last[1], input_mask):
                return dict(last[2], input_mask=input_mask)
        exprs = self.signature.mask_exprs()
        if every_node:
            exprs += [n.meta[K.MASK] for n in self.graph_module.graph.nodes
                      if n.meta.get(K.MASK) is not None and n.meta[K.SPATIAL].resolution is not None]
        # the memo evaluates an owned copy: derived masks may be views of the input mask
        base = input_mask if every_node else input_mask.clone()
        masks = M.evaluate_masks(exprs, base)
        blocks = {key: M.active_blocks(masks[key[0]], key[1]) for key in self.signature.blocks}
        stats = {"input_mask": input_mask, "masks": masks, "blocks": blocks}
        if not every_node:
            self._mask_stats_memo = (self._plan, base, stats)
        return stats

    def forward(self, *args, mask: Optional[torch.Tensor] = None, **kwargs) -> Any:
        """Record (first call for a slot) or run incrementally. Calls are serialized per engine."""
        with self._lock:
            return self._call(args, kwargs, mask)

    def _call(self, args, kwargs, mask: Optional[torch.Tensor]) -> Any:
        self._check_identity()
        flat = self._flatten(args, kwargs)
        key, fp = self._slot_key(flat)
        # an offloaded slot comes to the inputs' device for this call and goes back to the host after it
        device = flat[self._spatial_pos[0]].device if self._spatial_pos else self._device
        slot = self._fresh_slot(key, self.store.checkout(key, device or "cpu"))
        try:
            with torch.no_grad():
                if slot is None:
                    if mask is not None:
                        raise EngineError(f"no recorded run for slot {key[1]!r}: call the engine once without "
                                          "mask= on the original input to record it, then edit")
                    return self._record(flat, key, fp)
                if slot.nonspatial_fingerprint != fp:
                    raise EngineError(f"slot {key[1]!r} was recorded with different non-spatial inputs "
                                      "(timestep, embeddings, ...); use another slot name or clear() it")
                return self._incremental(flat, key, slot, self._input_mask(flat, slot, mask))
        finally:
            self.store.checkin(key)

    def _record(self, flat: list, key, fp: str) -> Any:
        outputs = self._store_recording(flat, key, fp, list(self.recording(*flat)))
        log.debug("recorded slot %r", key[1])
        return self._unflatten([o.clone() if isinstance(o, torch.Tensor) else o for o in outputs])

    def _store_recording(self, flat: list, key, fp: str, results: list) -> list:
        """Keep a run of the recording graph as slot ``key``; returns its outputs."""
        n_out = self.signature.num_outputs
        outputs, caches = results[:n_out], [self._store_dtype(i, c) for i, c in enumerate(results[n_out:])]
        for pos, nhwc in self._working_buffers:
            caches[pos] = _writable(caches[pos], nhwc)
        # an output that is also a working buffer would change under later edits
        buffers = {id(caches[pos]) for pos, _ in self._working_buffers}
        outputs = [o.clone() if id(o) in buffers else o for o in outputs]
        spatial = [flat[p].detach().clone() for p in self._spatial_pos]
        self.store.put(key, Slot(spatial, caches, outputs, fp, self._state_versions()))
        self._pending = None
        return outputs

    def _incremental(self, flat: list, key, slot: Slot, input_mask: torch.Tensor) -> Any:
        if not bool(input_mask.any()):
            self._restore(slot)
            self.last_stats = {"input_mask": input_mask, "masks": {}, "blocks": {}}
            self._pending = None
            return self._unflatten([o.clone() if isinstance(o, torch.Tensor) else o for o in slot.outputs])
        if bool(input_mask.all()):
            return self._dense_edit(flat, key, slot, input_mask)
        plan = self._plan = self.plan_for(input_mask, slot)
        stats = self.mask_stats(input_mask)
        indices = [stats["blocks"][k] for k in plan.signature.blocks]
        if self._cheaper_dense(plan, indices):
            return self._dense_edit(flat, key, slot, input_mask)
        pixel = [stats["masks"][m][None, None] for m in plan.signature.pixel_masks]
        # baselines saved before anything is written, so a run that fails part-way is undone too
        slot.dirty = _rebase_working_buffers(slot, [(pos, indices[b], block, nhwc)
                                                    for pos, b, block, nhwc in self._inplace[id(plan)]])
        caches = [slot.caches[i] for i in plan.cache_positions]
        results = list(plan.incremental(*flat, *caches, *indices, *pixel))
        n_out = plan.signature.num_outputs
        # outputs may be working buffers, which the next edit overwrites
        outputs = [o.clone() if isinstance(o, torch.Tensor) else o for o in results[:n_out]]
        updated = results[n_out:]
        self.last_stats = stats
        self._pending = {"key": key, "plan": self.plans.index(plan), "outputs": outputs, "updated": dict(zip(plan.signature.updated, updated)),
                         "spatial": [flat[p].detach().clone() for p in self._spatial_pos]}
        return self._unflatten(list(outputs))

    def _cheaper_dense(self, plan: Plan, indices: list) -> bool:
        """Whether the cost model prices this edit's sparse ops above running them dense."""
        priced = self._priced[id(plan)]
        if not priced:
            return False
        sparse = dense = 0.0
        for node, position, cells in priced:
            s, d = estimated_seconds(node, len(indices[position]) / cells, plan.context.kernel_costs)
            sparse, dense = sparse + s, dense + d
        return sparse > dense

    def _dense_edit(self, flat: list, key, slot: Slot, input_mask: torch.Tensor) -> Any:
        """An edit that covers the whole input is a dense run: the recording graph on the edited
        inputs. (An incremental run would keep the recorded normalization statistics, which an
        edit of everything changes, and differ from dense.) The slot is untouched; ``commit()``
        makes the run its new baseline."""
        self._restore(slot)
        results = list(self.recording(*flat))
        flat = [v.detach().clone() if i in self._spatial_pos else v for i, v in enumerate(flat)]
        n_out = self.signature.num_outputs
        outputs = [o.clone() if isinstance(o, torch.Tensor) else o for o in results[:n_out]]
        self.last_stats = {"input_mask": input_mask, "masks": {}, "blocks": {}, "dense": True}
        self._pending = {"key": key, "slot": (flat, results)}
        return self._unflatten(outputs)

    def commit(self) -> None:
        """Make the last edited run the new baseline, so the next edit is compared with it."""
        with self._lock:
            self._commit()

    def _commit(self) -> None:
        if self._pending is None:
            raise EngineError("nothing to commit: commit() follows an incremental call that changed something")
        p = self._pending
        slot = self.store.get(p["key"])
        if slot is None:
            raise EngineError("the slot of the last edit was evicted; nothing to commit")
        if "slot" in p:  # a dense edit: its run is recorded as the slot
            flat, results = p["slot"]
            self._pending = None
            self._store_recording(flat, p["key"], slot.nonspatial_fingerprint, results)
            return
        if slot.state_versions != self._state_versions():
            self._pending = None
            raise EngineError("weights changed since the last edit was computed; nothing to commit")
        caches = list(slot.caches)
        for i, (name, kind) in enumerate(self.cache_keys):
            if kind == VALUE and name in p["updated"]:
                caches[i] = self._store_dtype(i, p["updated"][name])
        # the in-place caches already hold the edit: committing keeps their blocks (dirty=None).
        # Caches the committing plan does not maintain now lag behind: plans reading them are out.
        maintained = self._maintained[p["plan"]]
        fresh = frozenset(i for i, m in enumerate(self._maintained) if m <= maintained)
        self.store.put(p["key"], Slot(p["spatial"], caches, list(p["outputs"]), slot.nonspatial_fingerprint,
                                      slot.state_versions, fresh_plans=fresh))
        self._pending = None

    @staticmethod
    def _restore(slot: Slot) -> None:
        """Put back the blocks an uncommitted edit overwrote in the slot's in-place caches."""
        for entry in slot.dirty or []:
            _put_back(slot, entry)
        slot.dirty = None

    def _store_dtype(self, index: int, value: torch.Tensor) -> torch.Tensor:
        if self.cache_dtype is None or index not in self._narrowable or not value.is_floating_point():
            return value
        return value.to(self.cache_dtype)

    def _unflatten(self, outputs: list) -> Any:
        return pytree.tree_unflatten(outputs, self._out_spec)

    # -- introspection ------------------------------------------------------------------------
    def report(self, mask: Optional[torch.Tensor] = None) -> "Report":
        """Per-node decisions, mask fractions and MACs for ``mask`` (default: the last edit), in
        the plan an edit of that mask runs (which becomes the engine's current plan)."""
        from sigec.core.report import build_report
        if mask is None and self.last_stats is not None:
            mask = self.last_stats["input_mask"]
        if mask is not None:
            self._plan = self.plan_for(mask)
        stats = self.mask_stats(mask, every_node=True) if mask is not None else None
        return build_report(self, stats)
