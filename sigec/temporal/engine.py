"""``TemporalEngine``: runs a denoising network with reuse across steps (the rules are in
``sigec.temporal``'s docstring: step index, streams, new trajectories, cache, composition)."""
from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Hashable, Optional, Sequence

import torch
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from sigec.core import inputs
from sigec.core.capture import as_captured
from sigec.core.engine import EngineError
from sigec.ir.settings import CompileSettings
from sigec.ir.macs import node_macs
from sigec.passes.pass_base import UserInputError
from sigec.passes.specialize_cut import CutSpecialization
from sigec.runtime.cache import Slot, SlotStore, fingerprint
from sigec.spatial import build_engine
from sigec.temporal.auto import Auto, choose_key_steps, step_weights
from sigec.temporal.batching import batchable
from sigec.temporal.cuts import scope
from sigec.temporal.specs import TemporalSpec

log = logging.getLogger("sigec.temporal")


class TemporalCompositionError(UserInputError):
    """Two features that cannot be combined were asked for together."""



FULL, PARTIAL = "full", "partial"


@dataclasses.dataclass
class _Trajectory:
    """What the engine knows about one stream's current trajectory."""

    start: int                       # absolute step index of its first step
    last: int                        # absolute index of its latest step
    num_steps: Optional[int]         # its length (None: unknown, explicit steps without a count)
    timesteps: Any = None            # the scheduler's timesteps tensor when it began
    keys: Optional[frozenset] = None  # key steps (relative), when the schedule gives them up front
    calibrating: bool = False         # an Auto schedule measuring reuse errors on this trajectory
    recent_cuts: list = dataclasses.field(default_factory=list)  # (step, cut values) of the last steps
    stale_error: dict = dataclasses.field(default_factory=dict)  # (key step, step) -> relative output error
    pending: dict = dataclasses.field(default_factory=dict)  # batched partial results by absolute index
    history: list = dataclasses.field(default_factory=list)  # (relative step, FULL | PARTIAL)


class TemporalEngine(torch.nn.Module):
    """Runs a denoising network with reuse across steps (see the module docstring for the rules).

    Attributes:
        specialization: the cut, the full and partial GraphModules and the partial graph's reads.
        full, partial: the two GraphModules.
        store: the ``SlotStore`` holding the cut values, one slot per stream.
        last_kind: ``"full"`` or ``"partial"``, what the latest call ran.
    """

    def __init__(self, graph_module: GraphModule, specialization: CutSpecialization, temporal: TemporalSpec,
                 scheduler, in_spec, out_spec, input_names: list[str], latent_names: Optional[Sequence[str]],
                 store: SlotStore, on_stale: str = "rerecord", cache_dtype: Optional[torch.dtype] = None,
                 source: Optional[torch.nn.Module] = None):
        super().__init__()
        self.specialization = specialization
        self.full = specialization.full
        self.partial = specialization.partial
        self.temporal = temporal
        self.schedule = temporal.make_schedule()
        self.scheduler = scheduler
        self.store = store
        self.on_stale = on_stale
        self.cache_dtype = cache_dtype
        self.input_names = list(input_names)
        self._in_spec, self._out_spec = in_spec, out_spec
        placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
        self._examples = [n.meta.get("val") for n in placeholders]
        self._latent_pos = self._find_latents(latent_names)
        self._timestep_pos = self._find_timestep()
        self._stream_pos = [i for i in range(len(self._examples))
                            if i not in self._latent_pos and i != self._timestep_pos]
        # the model's own parameters and buffers, as the graphs read them; where each lives in the
        # user's model (weakly: the engine must not own the model nor become its parent module)
        self._watched = [(name, t, id(t)) for name, t in
                         list(graph_module.named_parameters()) + list(graph_module.named_buffers())]
        self._placement = [(t.dtype, t.device) for _, t, _ in self._watched]
        self._owners = inputs.owners(source, [name for name, _, _ in self._watched]) if source is not None else []
        self._device = self._watched[0][1].device if self._watched else None
        self._cut_dtypes = [n.meta["val"].dtype for n in self.partial.graph.nodes
                            if n.op == "placeholder"][len(self._examples):]
        self._lock = threading.RLock()
        self._explicit: Optional[tuple[int, Optional[int]]] = None
        self._streams: dict[Hashable, _Trajectory] = {}
        self._auto_keys: dict[int, frozenset] = {}
        self._full_engine = self._partial_engine = None
        self._batched: Optional[GraphModule] = None
        self.last_kind: Optional[str] = None
        self._macs = {FULL: sum(node_macs(n) for n in self.full.graph.nodes),
                      PARTIAL: sum(node_macs(n) for n in self.partial.graph.nodes)}
        if temporal.batch_partial_steps:
            self._checkbatchable()

    # -- set-up -------------------------------------------------------------------------------
    def _find_latents(self, names: Optional[Sequence[str]]) -> list[int]:
        if names is not None:
            unknown = [n for n in names if n not in self.input_names]
            if unknown:
                raise UserInputError(f"spatial_inputs names {unknown} that are not inputs; inputs are "
                                     f"{self.input_names}")
            return [self.input_names.index(n) for n in names]
        return [i for i, v in enumerate(self._examples) if isinstance(v, torch.Tensor) and v.dim() == 4
                and v.is_floating_point() and tuple(v.shape[-2:]) != (1, 1)]

    def _find_timestep(self) -> Optional[int]:
        """The input holding the timestep: named so, else the one scalar-like non-latent tensor."""
        named = [i for i, n in enumerate(self.input_names) if n in ("timestep", "timesteps", "t")]
        if len(named) == 1:
            return named[0]
        batch = int(self._examples[self._latent_pos[0]].shape[0]) if self._latent_pos else 1
        scalar = [i for i, v in enumerate(self._examples) if i not in self._latent_pos
                  and isinstance(v, torch.Tensor) and v.dim() <= 1 and v.numel() <= batch]
        return scalar[0] if len(scalar) == 1 else None

    def _checkbatchable(self) -> None:
        latents = [self.input_names[i] for i in self._latent_pos]
        read = [n for n in latents if self.specialization.reads_input(n)]
        if read:
            raise TemporalCompositionError(
                f"batch_partial_steps needs a partial graph that does not read the latent, but this cut's partial "
                f"graph reads {read}: a partial step then depends on the previous step's result. FasterDiffusion's "
                "cut (encoder and mid block) does not read it; DeepCache's cuts do")
        if self.temporal.edits:
            raise TemporalCompositionError("batch_partial_steps and edits=True cannot be combined: an edit runs each "
                                           "partial step through its own spatial cache slot")
        if self.scheduler is None or self._timestep_pos is None:
            raise TemporalCompositionError("batch_partial_steps needs scheduler= (the timesteps of the steps ahead) "
                                           "and a model input that is the timestep")

    def build_spatial_engines(self, settings: CompileSettings, engine_options: dict) -> None:
        """The spatial engines of ``edits=True``, built from the full and the partial graph (both derived
        from the captured program, so nothing is captured again)."""
        cut_vals = [n.meta["val"] for n in self.partial.graph.nodes if n.op == "placeholder"][len(self._examples):]
        latent_vals = [self._examples[i] for i in self._latent_pos
                       if self.specialization.reads_input(self.input_names[i])]
        images = [v for v in latent_vals + cut_vals if v.dim() == 4 and tuple(v.shape[-2:]) != (1, 1)]
        resolutions = sorted({tuple(int(s) for s in v.shape[-2:]) for v in images})
        if len(resolutions) != 1:
            raise TemporalCompositionError(
                f"edits=True needs the partial graph's image inputs (latent and cut values) at one resolution, but "
                f"they are at {resolutions}: spatial engines mask one input resolution. Use a cut at the input "
                f"resolution (DeepCache branch 0, or a Reuse cut of modules at full resolution), or edits=False")
        latents = [self.input_names[i] for i in self._latent_pos]
        cut_names = [n.name for n in self.partial.graph.nodes if n.op == "placeholder"][len(self._examples):]
        self.full.eval(), self.partial.eval()
        self._full_engine = build_engine(as_captured(self.full), dataclasses.replace(settings, spatial_inputs=tuple(latents)),
                                         source=self.full, **engine_options)
        partial_inputs = tuple([n for n in latents if self.specialization.reads_input(n)] + cut_names)
        self._partial_engine = build_engine(as_captured(self.partial),
                                            dataclasses.replace(settings, spatial_inputs=partial_inputs),
                                            source=self.partial, **engine_options)

    # -- public controls ----------------------------------------------------------------------
    def step(self, index: int, num_steps: Optional[int] = None) -> "TemporalEngine":
        """Set the step index of the calls that follow (until the next ``step``); returns the engine,
        so ``engine.step(i)(x, t)`` works. ``num_steps`` is the trajectory's length, needed by
        schedules scaled to it when no scheduler was given."""
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"step index must be an integer >= 0, got {index!r}")
        self._explicit = (index, num_steps)
        return self

    def reset(self) -> None:
        """Forget every trajectory and cached cut value: the next call of each stream is a key step."""
        with self._lock:
            self._streams.clear()
            self.store.clear()
            for engine in (self._full_engine, self._partial_engine):
                if engine is not None:
                    engine.clear()

    @property
    def spatial_engines(self) -> Optional[dict]:
        """``{"full": Engine, "partial": Engine}`` of ``edits=True`` (``None`` otherwise)."""
        if self._full_engine is None:
            return None
        return {FULL: self._full_engine, PARTIAL: self._partial_engine}

    def macs(self) -> dict[str, int]:
        """Dense MACs of one full step and of one partial step, counted from the graphs."""
        return dict(self._macs)

    def key_steps(self, num_steps: int) -> frozenset:
        """The key steps (relative to the trajectory's start) of an ``num_steps``-step trajectory."""
        if isinstance(self.schedule, Auto):
            if num_steps not in self._auto_keys:
                raise EngineError(f"the 'auto' schedule has not measured a {num_steps}-step trajectory yet "
                                  "(its first trajectory runs every step in full)")
            return self._auto_keys[num_steps]
        return self.schedule.key_steps(num_steps)

    def loop_macs(self, num_steps: int) -> int:
        """MACs of an ``num_steps``-step trajectory under the schedule."""
        keys = self.key_steps(num_steps)
        return len(keys) * self._macs[FULL] + (num_steps - len(keys)) * self._macs[PARTIAL]

    def history(self) -> dict[Hashable, list]:
        """``(relative step, "full" | "partial")`` of every call of each stream's current trajectory."""
        return {k: list(t.history) for k, t in self._streams.items()}

    def cut_modules(self) -> list[str]:
        """The module each cut value comes out of (``Reuse(cut=engine.cut_modules())`` names the same cut
        when each of those modules has that one output)."""
        by_name = {n.name: n for n in self.full.graph.nodes}
        return list(dict.fromkeys(scope(by_name[name])[-1] for name in self.specialization.cut
                                  if scope(by_name[name])))

    def describe(self) -> str:
        """The cut, the dependence analysis and the MACs, in a few lines."""
        spec = self.specialization
        by_name = {n.name: n for n in self.full.graph.nodes}
        lines = [f"temporal reuse: {self.temporal}",
                 f"cut values ({len(spec.cut)}):"]
        for name in spec.cut:
            n = by_name[name]
            where = scope(n)[-1] if scope(n) else "-"
            lines.append(f"  {name:24s} {'x'.join(map(str, n.meta['val'].shape)):>16s}  from {where}")
        lines.append(f"partial graph reads: {list(spec.reads)} (of {list(spec.inputs)})")
        f, p = self._macs[FULL], self._macs[PARTIAL]
        lines.append(f"MACs per step: full {f:,}, partial {p:,} ({f / max(p, 1):.2f}x fewer)")
        return "\n".join(lines)

    def _apply(self, fn, recurse=True):
        inputs.refuse_move(self._watched[0][1] if getattr(self, "_watched", None) else None, fn, EngineError)
        return super()._apply(fn, recurse)

    # -- calling ------------------------------------------------------------------------------
    def forward(self, *args, mask: Optional[torch.Tensor] = None, **kwargs) -> Any:
        with self._lock:
            return self._call(args, kwargs, mask, self._explicit)

    def _check_identity(self) -> None:
        inputs.check_identity(self._watched, self._placement, self._owners, EngineError)

    def _flatten(self, args, kwargs) -> list:
        return inputs.flatten_inputs(args, kwargs, self._in_spec, self.input_names, self._examples, self._device,
                                     EngineError)

    def _state_versions(self) -> tuple:
        return inputs.state_versions(self._watched)

    def _scheduler_index(self, flat: list, previous: Optional[int]) -> int:
        s = self.scheduler
        index = getattr(s, "step_index", None)
        if index is not None:
            return int(index)
        if self._timestep_pos is None:
            raise EngineError(f"cannot tell which input is the timestep (inputs {self.input_names}): call "
                              "engine.step(i) before each step")
        t = flat[self._timestep_pos].reshape(-1)[0]
        timesteps = s.timesteps
        hits = (timesteps.to(t.device) == t.to(timesteps.dtype)).nonzero().flatten().tolist()
        if not hits:
            raise EngineError(f"timestep {t.item()} is not in scheduler.timesteps: pass the scheduler the loop uses, "
                              "or call engine.step(i)")
        begin = getattr(s, "begin_index", None) or 0
        hits = [h for h in hits if h >= begin] or hits
        later = [h for h in hits if previous is not None and h > previous]
        return later[0] if later else hits[0]

    def _resolve(self, flat: list, stream: Hashable, explicit) -> tuple[int, Optional[int], Any]:
        """``(absolute step index, trajectory length or None, timesteps tensor or None)``."""
        if explicit is not None:
            index, num_steps = explicit
            if num_steps is None and self.scheduler is not None:
                num_steps = len(self.scheduler.timesteps)
            return index, num_steps, None
        if self.scheduler is None:
            raise EngineError("no step index: pass scheduler= to sigec.compile (its timesteps give the index), or "
                              "call engine.step(i) before each step")
        trajectory = self._streams.get(stream)
        index = self._scheduler_index(flat, trajectory.last if trajectory is not None else None)
        return index, len(self.scheduler.timesteps), self.scheduler.timesteps

    def _begin(self, stream: Hashable, index: int, num_steps: Optional[int], timesteps) -> _Trajectory:
        length = None if num_steps is None else max(num_steps - index, 1)
        trajectory = _Trajectory(start=index, last=index, num_steps=length, timesteps=timesteps)
        if isinstance(self.schedule, Auto):
            if length is None:
                raise EngineError("the 'auto' schedule needs the trajectory's length: pass scheduler= to "
                                  "sigec.compile, or engine.step(i, num_steps=n)")
            trajectory.keys = self._auto_keys.get(length)
            trajectory.calibrating = trajectory.keys is None
        else:
            trajectory.keys = self.schedule.key_steps(length)
        self._streams[stream] = trajectory
        log.debug("stream %s: new trajectory at step %d (%s steps)", str(stream)[:8], index, length)
        return trajectory

    def _is_key(self, trajectory: _Trajectory, step: int) -> bool:
        if trajectory.calibrating:
            return True
        if trajectory.keys is not None:
            return step in trajectory.keys
        return self.schedule.is_key(step, trajectory.num_steps)

    def _call(self, args, kwargs, mask, explicit) -> Any:
        self._check_identity()
        flat = self._flatten(args, kwargs)
        if mask is not None and self._full_engine is None:
            raise EngineError("mask= needs an engine compiled with edits=True (temporal=...(edits=True))")
        stream = fingerprint([flat[i] for i in self._stream_pos])
        index, num_steps, timesteps = self._resolve(flat, stream, explicit)
        trajectory = self._streams.get(stream)
        timesteps_reset = timesteps is not None and trajectory is not None and trajectory.timesteps is not None \
            and timesteps is not trajectory.timesteps
        if trajectory is None or index <= trajectory.last or timesteps_reset:
            trajectory = self._begin(stream, index, num_steps, timesteps)
        trajectory.last = index
        step = index - trajectory.start
        with torch.no_grad():
            if index in trajectory.pending:
                outputs = trajectory.pending.pop(index)
                kind = PARTIAL
            else:
                kind = FULL if self._is_key(trajectory, step) else PARTIAL
                slot = self._cut_slot(stream) if kind == PARTIAL else None
                if kind == PARTIAL and slot is None:
                    kind = FULL  # evicted or stale: recompute (never reuse what may be wrong)
                if kind == FULL:
                    outputs = self._run_full(flat, stream, trajectory, step, mask)
                else:
                    outputs = self._run_partial(flat, slot, trajectory, index, mask)
        trajectory.history.append((step, kind))
        self.last_kind = kind
        return pytree.tree_unflatten(list(outputs), self._out_spec)

    def _cut_slot(self, stream: Hashable) -> Optional[Slot]:
        slot = self.store.get(("cut", stream))
        if slot is None:
            log.info("cut values of stream %s are not cached (evicted); running the step in full", str(stream)[:8])
            return None
        if slot.state_versions != self._state_versions():
            if self.on_stale == "raise":
                raise EngineError("weights changed since the cut values were cached: call engine.reset(), or compile "
                                  "with on_stale='rerecord'")
            log.info("weights changed since the cut values were cached; running the step in full")
            return None
        return slot

    def _run_full(self, flat: list, stream: Hashable, trajectory: _Trajectory, step: int, mask) -> list:
        if self._full_engine is not None:
            results = list(self._full_engine(*flat, mask=mask))
        else:
            results = list(self.full(*flat))
        n = self.specialization.num_outputs
        outputs, cut = results[:n], results[n:]
        ids = {id(o) for o in outputs}
        cut = [c.clone() if id(c) in ids else c for c in cut]  # never alias what the caller receives
        stored = [c.to(self.cache_dtype) if self.cache_dtype is not None and c.is_floating_point() else c for c in cut]
        self.store.put(("cut", stream), Slot([], stored, [], str(stream), self._state_versions()))
        if trajectory.calibrating:
            self._measure(trajectory, step, flat, outputs, cut)
        return outputs

    def _measure(self, trajectory: _Trajectory, step: int, flat: list, outputs: list, cut: list) -> None:
        """The 'auto' schedule's calibration: the error of this step's outputs had it reused the cut
        values of each recent step (one partial run each), then, at the last step, the key steps."""
        if step != (trajectory.recent_cuts[-1][0] + 1 if trajectory.recent_cuts else 0):
            trajectory.calibrating = False  # steps were skipped: this trajectory cannot calibrate
            log.warning("the 'auto' calibration trajectory skipped steps; it will calibrate on the next one")
            return
        reference = torch.cat([o.detach().reshape(-1).double() for o in outputs if isinstance(o, torch.Tensor)])
        scale = float(reference.norm()) or 1.0
        for k, old in trajectory.recent_cuts:
            reused = list(self.partial(*flat, *old))
            got = torch.cat([o.detach().reshape(-1).double() for o in reused if isinstance(o, torch.Tensor)])
            trajectory.stale_error[(k, step)] = float((got - reference).norm()) / scale
        trajectory.recent_cuts.append((step, [c.clone() for c in cut]))
        del trajectory.recent_cuts[:-self.schedule.window]
        n = trajectory.num_steps
        if n is not None and step == n - 1:
            timesteps = trajectory.timesteps if trajectory.timesteps is not None else getattr(self.scheduler,
                                                                                           "timesteps", None)
            weights = (step_weights(self.scheduler, timesteps[trajectory.start:trajectory.start + n].tolist())
                       if timesteps is not None else None)
            keys = choose_key_steps(trajectory.stale_error, n, self.schedule.budget(n), weights)
            self._auto_keys[n] = keys
            trajectory.calibrating, trajectory.recent_cuts = False, []
            log.info("auto schedule for %d steps: key steps %s", n, sorted(keys))

    def _widen(self, slot: Slot) -> list:
        return [c.to(d) if c.dtype != d else c for c, d in zip(slot.caches, self._cut_dtypes)]

    def _run_partial(self, flat: list, slot: Slot, trajectory: _Trajectory, index: int, mask) -> list:
        cut = self._widen(slot)
        if self._partial_engine is not None:
            return list(self._partial_engine(*flat, *cut, mask=mask))
        if self.temporal.batch_partial_steps:
            return self._run_batched(flat, cut, trajectory, index)
        return list(self.partial(*flat, *cut))

    def _run_batched(self, flat: list, cut: list, trajectory: _Trajectory, index: int) -> list:
        """This partial step and the following ones up to the next key step, as one batch."""
        timesteps = self.scheduler.timesteps
        end = index
        while (end + 1 < len(timesteps) and end + 1 - trajectory.start < (trajectory.num_steps or 0)
               and not self._is_key(trajectory, end + 1 - trajectory.start)):
            end += 1
        if end == index:
            return list(self.partial(*flat, *cut))
        current = flat[self._timestep_pos]
        stacked = torch.stack([timesteps[i].to(current.dtype).to(current.device).expand(current.shape)
                               for i in range(index, end + 1)])
        if self._batched is None:
            self._batched = batchable(self.partial)
        pos = self._timestep_pos

        def one(t):
            inputs = list(flat)
            inputs[pos] = t
            return tuple(self._batched(*inputs, *cut))

        results = torch.func.vmap(one)(stacked)
        for k, i in enumerate(range(index + 1, end + 1), start=1):
            trajectory.pending[i] = [r[k] for r in results]
        log.debug("batched partial steps %d..%d", index, end)
        return [r[0] for r in results]
