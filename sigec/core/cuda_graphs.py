"""Faster incremental runs on GPUs: replay with CUDA graphs, or compile with inductor.

An edit's incremental graph launches many small kernels (gathers, convolutions over a few
blocks, scatters). On a fast GPU their launch overhead, not their arithmetic, bounds the latency.
For a fixed mask the kernel sequence is fixed too (the block counts set every shape), so it can
be captured once into a CUDA graph and replayed as one launch.

``set_runner(engine, runner)`` wraps each plan's incremental GraphModule:

* ``"eager"``: the GraphModule itself (the default; also undoes the others).
* ``"cuda-graphs"``: the first call for a given set of block counts and cache tensors runs
  eagerly (that call's result, and the warm-up capture needs), then is captured; later calls
  with the same block counts and caches copy the inputs into the graph's static buffers and
  replay it.
* ``"inductor"``: ``torch.compile(graph_module)``, which fuses the dense pointwise parts (a new
  set of block counts recompiles).
* ``"inductor+cuda-graphs"``: the inductor-compiled graph, captured and replayed as above.

::

    engine = sigec.compile(model.cuda().half(), (x, t))
    engine(x, t)                                  # record
    sigec.core.cuda_graphs.set_runner(engine, "cuda-graphs")
    y = engine(x_edit, t)                         # eager, then captured
    y = engine(x_edit, t)                         # replayed

What a captured graph holds fixed, and so keys it: the shapes, strides and dtypes of every input
(the block counts are the shapes of the block-index inputs), Python values among the inputs, and
the addresses of the cached tensors (the graph reads and writes them in place, so each slot gets
its own capture, and a commit that replaces cached tensors captures again). Each plan has its own
runner, and the engine fixes the user inputs' shapes, so a capture stands for one (slot, plan,
active-block count per grid): ``capture_records()`` lists them that way, with the seconds each
capture took and the device memory it holds (shown by ``engine.report()``). The user inputs,
block indices and pixel masks are copied into the static buffers on every replay. Outputs are
returned as new tensors, except the cached tensors the graph updates in place, which are
returned as themselves (as the eager graph does). At most ``max_graphs`` captures are kept per
plan, least recently used first out.

The engine's own per-call work stays eager: mask evaluation and block indices (one device sync
for the data-dependent block counts), saving and restoring the blocks an edit overwrites. A
graph whose capture fails (for example, an op without a CUDA kernel that synchronizes) runs
eagerly, with one warning.
"""
from __future__ import annotations

import collections
import collections.abc
import dataclasses
import logging
import time
import warnings
from itertools import chain
from typing import Any, Callable, Optional, Protocol

import torch
from torch.fx import GraphModule

from sigec.core.codegen.incremental import IncrementalSignature

log = logging.getLogger("sigec.core.cuda_graphs")

RUNNERS = ("eager", "cuda-graphs", "inductor", "inductor+cuda-graphs")


class Recorder(Protocol):
    """How a call is captured and replayed: ``capture(fn, static_args)`` returns ``(replay,
    outputs)``, where ``replay()`` recomputes ``outputs`` in place from the current contents of
    ``static_args``. CUDA graphs in production; tests substitute a host implementation.

    A recorder may also have ``memory_in_use() -> int``: bytes its device holds; the difference
    across a capture is the memory the capture keeps (without it, the outputs' bytes are taken)."""

    def capture(self, fn: Callable, static_args: list) -> tuple[Callable[[], None], Any]: ...


class CudaGraphRecorder:
    """Captures with ``torch.cuda.graph`` (each graph in its own memory pool, so evicting a
    graph frees its memory)."""

    def capture(self, fn: Callable, static_args: list) -> tuple[Callable[[], None], Any]:
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work of other threads during the capture is not an error
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = fn(*static_args)
        return graph.replay, outputs

    @staticmethod
    def memory_in_use() -> int:
        """Bytes the caching allocator reserves: a capture's private pool reserves its own segments."""
        return torch.cuda.memory_reserved()


@dataclasses.dataclass
class CaptureRecord:
    """One held CUDA graph of a plan's runner.

    Attributes:
        slot: the name of the slot whose caches the graph reads and writes (``None`` where the
            caller did not name slots; ``capture_records`` takes a map from cache address to name).
        plan: the planned edit area of the plan the runner runs.
        block_counts: active blocks of each grid, in the order of the graph's block-index inputs.
        capture_s: seconds the capture took (the eager call before it not included).
        memory_bytes: device memory the capture keeps: its static input copies and its pool
            (``static_bytes`` of it are the copies).
        replays: times the graph was replayed.
    """

    slot: Any
    plan: Optional[float]
    block_counts: tuple
    capture_s: float
    memory_bytes: int
    static_bytes: int
    replays: int = 0

    @property
    def active_blocks(self) -> int:
        return sum(self.block_counts)

    def describe(self) -> str:
        name = str(self.slot)
        slot = "" if self.slot is None else f"slot {name if len(name) <= 16 else name[:8] + '...'}, "
        return (f"{slot}{self.active_blocks} blocks {list(self.block_counts)}: captured in {self.capture_s * 1e3:.1f} ms, "
                f"{self.memory_bytes / 2**20:.2f} MiB, {self.replays} replays")


class _Capture:
    def __init__(self, replay: Callable[[], None], static_args: list, outputs: Any, cache_storages: set,
                 record: CaptureRecord, cache_addresses: tuple):
        self.replay = replay
        self.static_args = static_args
        self.outputs = tuple(outputs) if isinstance(outputs, (list, tuple)) else (outputs,)
        # outputs that are cached tensors updated in place are returned as themselves
        self.returns_cache = [isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() in cache_storages
                              for o in self.outputs]
        self.record = record
        self.cache_addresses = cache_addresses


def _nbytes(values: Any) -> int:
    return sum(v.untyped_storage().nbytes() for v in values if isinstance(v, torch.Tensor))


class IncrementalRunner(torch.nn.Module):
    """Runs one plan's incremental GraphModule through ``fn`` (the GraphModule itself or its
    ``torch.compile``), optionally captured and replayed as CUDA graphs.

    It stands in for the GraphModule in ``Plan.incremental``: attributes it does not have
    (``graph``, ``code``, ...) are the GraphModule's, so reports and dumps read the same graph.

    Attributes:
        graph_module: the wrapped incremental GraphModule.
        planned_fraction: the planned edit area of the plan (for capture records).
        captures, replays, eager_calls: counts, for tests and reports.
        capture_s: seconds spent capturing, evicted graphs included.
    """

    def __init__(self, graph_module: GraphModule, signature: IncrementalSignature, *,
                 fn: Optional[Callable] = None, replay: bool = True, max_graphs: int = 4,
                 recorder: Optional[Recorder] = None, planned_fraction: Optional[float] = None):
        super().__init__()
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.graph_module = graph_module
        self.signature = signature
        self.fn = fn if fn is not None else graph_module
        self.replay = replay
        self.max_graphs = max_graphs
        self.recorder = recorder if recorder is not None else CudaGraphRecorder()
        self._captures: "collections.OrderedDict[tuple, _Capture]" = collections.OrderedDict()
        self._uncapturable: set = set()
        self.planned_fraction = planned_fraction
        self.captures = self.replays = self.eager_calls = 0
        self.capture_s = 0.0

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("graph_module"), name)

    # -- positions of the incremental graph's inputs -------------------------------------------
    def _cache_positions(self, n_args: int) -> range:
        sig = self.signature
        first = n_args - len(sig.caches) - len(sig.blocks) - len(sig.pixel_masks)
        return range(first, first + len(sig.caches))

    def _block_positions(self, n_args: int) -> range:
        sig = self.signature
        first = n_args - len(sig.blocks) - len(sig.pixel_masks)
        return range(first, first + len(sig.blocks))

    def _key(self, args: tuple, caches: range) -> tuple:
        parts = []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                address = a.data_ptr() if i in caches else None
                parts.append((tuple(a.shape), a.stride(), a.dtype, a.device, address))
            else:
                parts.append(("value", a if isinstance(a, collections.abc.Hashable) else repr(a)))
        return tuple(parts)

    # -- calling --------------------------------------------------------------------------------
    def forward(self, *args: Any) -> Any:
        if not self.replay:
            self.eager_calls += 1
            return self.fn(*args)
        caches = self._cache_positions(len(args))
        key = self._key(args, caches)
        capture = self._captures.get(key)
        if capture is not None:
            self._captures.move_to_end(key)
            return self._replay(capture, args, caches)
        self.eager_calls += 1
        outputs = self.fn(*args)  # this call's result, and the warm-up the capture needs
        if key not in self._uncapturable:
            self._capture(key, args, caches)
        return outputs

    def _capture(self, key: tuple, args: tuple, caches: range) -> None:
        static_args = [a if i in caches or not isinstance(a, torch.Tensor) else torch.empty_like(a).copy_(a)
                       for i, a in enumerate(args)]
        memory = getattr(self.recorder, "memory_in_use", None)
        before = memory() if memory is not None else 0
        start = time.perf_counter()
        try:
            replay, outputs = self.recorder.capture(self.fn, static_args)
        except Exception as exc:  # an op that synchronizes or has no capturable kernel
            self._uncapturable.add(key)
            warnings.warn(f"sigec: the incremental graph could not be captured as a CUDA graph ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); it runs eagerly for "
                          "these block counts", RuntimeWarning, stacklevel=3)
            return
        seconds = time.perf_counter() - start
        storages = {args[i].untyped_storage().data_ptr() for i in caches if isinstance(args[i], torch.Tensor)}
        listed = tuple(outputs) if isinstance(outputs, (list, tuple)) else (outputs,)
        static_bytes = _nbytes(a for i, a in enumerate(static_args) if i not in caches)
        pool = (memory() - before if memory is not None
                else _nbytes(o for o in listed if isinstance(o, torch.Tensor)
                             and o.untyped_storage().data_ptr() not in storages))
        blocks = tuple(int(args[i].shape[0]) for i in self._block_positions(len(args)))
        # static copies are allocated before ``before`` was read: add them once
        record = CaptureRecord(None, self.planned_fraction, blocks, seconds, max(pool, 0) + static_bytes, static_bytes)
        addresses = tuple(args[i].data_ptr() for i in caches if isinstance(args[i], torch.Tensor))
        self._captures[key] = _Capture(replay, static_args, outputs, storages, record, addresses)
        self.captures += 1
        self.capture_s += seconds
        while len(self._captures) > self.max_graphs:
            self._captures.popitem(last=False)
        log.debug("captured the incremental graph (%d held)", len(self._captures))

    def _replay(self, capture: _Capture, args: tuple, caches: range) -> tuple:
        for i, (static, a) in enumerate(zip(capture.static_args, args)):
            if i not in caches and isinstance(a, torch.Tensor) and static is not a:
                static.copy_(a)
        capture.replay()
        self.replays += 1
        capture.record.replays += 1
        # the graph overwrites its outputs on the next replay: hand out copies
        return tuple(o if cached or not isinstance(o, torch.Tensor) else o.clone()
                     for o, cached in zip(capture.outputs, capture.returns_cache))

    def capture_records(self, slot_names: Optional[dict] = None) -> list[CaptureRecord]:
        """The held captures, least recently used first. ``slot_names`` maps a cached tensor's
        ``data_ptr()`` to its slot's name (``engine.report()`` builds it from the slot store)."""
        records = []
        for capture in self._captures.values():
            names = {slot_names[a] for a in capture.cache_addresses if a in slot_names} if slot_names else set()
            slot = next(iter(names)) if len(names) == 1 else None
            records.append(dataclasses.replace(capture.record, slot=slot))
        return records

    def reset(self) -> None:
        """Drop every captured graph (they are captured again on the next calls)."""
        self._captures.clear()
        self._uncapturable.clear()


def _weights_device(gm: GraphModule) -> Optional[torch.device]:
    for t in chain(gm.parameters(), gm.buffers()):
        return t.device
    return None


def set_runner(engine, runner: str, *, max_graphs: int = 4, recorder: Optional[Recorder] = None,
               compile_options: Optional[dict] = None):
    """Run ``engine``'s incremental graphs with ``runner`` (one of ``RUNNERS``); returns the engine.

    ``"cuda-graphs"`` and ``"inductor+cuda-graphs"`` need an engine compiled on a CUDA device
    (``recorder`` replaces CUDA graph capture, for tests). ``compile_options`` go to
    ``torch.compile`` for the inductor runners. Calling it again replaces the previous runner;
    ``"eager"`` restores the plain GraphModules.
    """
    if runner not in RUNNERS:
        raise ValueError(f"unknown runner {runner!r}; expected one of {RUNNERS}")
    replay = runner.endswith("cuda-graphs")
    graphs = [p.incremental.graph_module if isinstance(p.incremental, IncrementalRunner) else p.incremental
              for p in engine.plans]
    if replay and recorder is None:
        device = next((d for d in map(_weights_device, graphs) if d is not None), None)
        if device is not None and device.type != "cuda":
            raise ValueError(f"runner {runner!r} replays CUDA graphs, but the engine's weights are on {device}: "
                             "move the model to a CUDA device and compile again, or use runner='inductor'")
        if not torch.cuda.is_available():
            raise ValueError(f"runner {runner!r} needs a CUDA device, and torch sees none "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None})")
    for plan, gm in zip(engine.plans, graphs):
        if runner == "eager":
            plan.incremental = gm
            continue
        fn = torch.compile(gm, **(compile_options or {})) if runner.startswith("inductor") else gm
        plan.incremental = IncrementalRunner(gm, plan.signature, fn=fn, replay=replay, max_graphs=max_graphs,
                                             recorder=recorder, planned_fraction=plan.planned_fraction)
    return engine
