"""The editor's state: one compiled engine per model, one cache slot and label map per session.

Compiling a model takes seconds (tens of seconds for the shipped landscape generator on two
cores), so the editor compiles it once (``EditorModel``) and gives every session its own named
cache slot in that engine (``with engine.slot(session_id):``). A session's recorded activations,
its label map and its undo history are its own; no call ever reads another session's slot.

Locking (``EditorModel.lock`` and ``Session.lock``):

* ``Session.lock`` guards one session's label map and history, and is held for the whole of a
  request on that session (a stroke, an undo, a reset), so a session's edits apply in order.
* ``EditorModel.lock`` guards the engine: an engine call and the ``commit()`` that follows it
  run under it as one step (the engine keeps its pending edit engine-wide, so another session's
  call between the two would commit the wrong edit). It also serializes all torch computation:
  on a CPU the calls would only compete for the same cores.
* The order is always session lock, then model lock; ``SessionManager._lock`` (the table of
  sessions) is never held while waiting for either.

``SessionManager`` bounds the number of sessions: creating one past ``max_sessions`` evicts the
least recently used (its slot is dropped; a later request on it gets 404). A session's slot holds
the recorded activations of every layer the engine reuses: about 630 MB for the landscape
generator at 256x512, hence the small default bound.
"""
from __future__ import annotations

import collections
import secrets
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

import sigec
from sigec.models.landscape import CLASSES, default_scene, noise_map, one_hot
from sigec.frontends.measure import output_block_mask


class SessionNotFound(KeyError):
    """No session with this id (never created, deleted, or evicted as least recently used)."""


class NothingToUndo(RuntimeError):
    """Undo on a session with no stroke left to undo."""


@dataclass
class EditResult:
    """What one engine call on a session produced."""

    image: torch.Tensor            # (3, H, W) in [-1, 1]
    labels: torch.Tensor           # (H, W) class indices after the call
    engine_ms: float               # the engine call alone (the incremental latency)
    edit_mask: torch.Tensor        # (H, W) bool: the pixels whose label changed
    recomputed: torch.Tensor       # (H, W) bool: the output-resolution blocks the engine ran
    macs: Optional[tuple[int, int]] = None  # (incremental, dense) MACs of the call, when known
    recorded: bool = False         # a dense recording (session start, reset), not an incremental call


class EditorModel:
    """A model compiled once, shared by every session through named cache slots.

    Args:
        model: the label-map generator (``labels (1, C, H, W) one-hot, noise (1, 1, H, W) ->
            (1, 3, H, W)``), or a zero-argument callable returning it.
        height, width: the canvas.
        policy: the engine's policy (``exact`` reproduces dense output to float rounding).
        noise_seed: the seed of the noise map (the pictures' style), the same for every session.
        dense_runs: timed dense runs per session start; their median is the session's dense latency.
        report_macs: count each edit's MACs (``engine.report``: outside the timed engine call, but
            it adds tens of milliseconds to every stroke's response on a busy CPU).
    """

    def __init__(self, model: Union[torch.nn.Module, Callable[[], torch.nn.Module]], height: int = 256,
                 width: int = 512, policy: str = "exact", noise_seed: int = 0, dense_runs: int = 3,
                 classes: Sequence[str] = CLASSES, initial_scene: Optional[Callable[[int, int], torch.Tensor]] = None,
                 report_macs: bool = False):
        if not isinstance(model, torch.nn.Module):
            model = model()
        self.model = model.eval()
        self.height, self.width = int(height), int(width)
        self.classes = tuple(classes)
        self.policy = policy
        self.dense_runs = max(1, int(dense_runs))
        self.report_macs = report_macs
        self.noise = noise_map(self.height, self.width, noise_seed)
        self._initial_scene = initial_scene or default_scene
        self.lock = threading.Lock()
        labels = self.initial_labels()
        with torch.no_grad():
            self.engine = sigec.compile(self.model, (one_hot(labels, len(self.classes)), self.noise), policy=policy)

    def initial_labels(self) -> torch.Tensor:
        return self._initial_scene(self.height, self.width).to(torch.long)

    def _run(self, session_id: str, labels: torch.Tensor, commit: bool) -> EditResult:
        """One engine call in ``session_id``'s slot (recording when the slot is new), committed
        when asked and when it changed something. Caller holds ``self.lock``."""
        x = one_hot(labels, len(self.classes))
        with torch.no_grad(), self.engine.slot(session_id):
            recorded = self.engine.store.get(("named", session_id)) is not None
            start = time.perf_counter()
            y = self.engine(x, self.noise)
            engine_ms = (time.perf_counter() - start) * 1e3
            stats = self.engine.last_stats if recorded else None
            input_mask = stats["input_mask"] if stats else torch.ones(self.height, self.width, dtype=torch.bool)
            changed = bool(input_mask.any())
            if recorded and commit and changed:
                self.engine.commit()
        recomputed = output_block_mask(stats, (self.height, self.width)) if recorded else input_mask.clone()
        return EditResult(y[0].detach().clone(), labels, engine_ms, input_mask.cpu().clone(), recomputed,
                          recorded=not recorded)

    def macs(self, input_mask: torch.Tensor) -> Optional[tuple[int, int]]:
        """(incremental, dense) MACs of an edit of ``input_mask`` (outside the timed call)."""
        try:
            report = self.engine.report(input_mask)
            return report.incremental_macs, report.dense_macs
        except Exception:  # the figure is informative; a failure must not fail the stroke
            return None

    def record(self, session_id: str, labels: torch.Tensor) -> EditResult:
        with self.lock:
            self.engine.store.discard(("named", session_id))
            return self._run(session_id, labels, commit=False)

    def edit(self, session_id: str, labels: torch.Tensor) -> EditResult:
        with self.lock:
            result = self._run(session_id, labels, commit=True)
            if self.report_macs and result.edit_mask.any():
                result.macs = self.macs(result.edit_mask)
            return result

    def dense_latency_ms(self) -> float:
        """Median of ``dense_runs`` timed runs of the plain model (no engine) on the canvas."""
        x = one_hot(self.initial_labels(), len(self.classes))
        times = []
        with self.lock, torch.no_grad():
            for _ in range(self.dense_runs):
                start = time.perf_counter()
                self.model(x, self.noise)
                times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def drop(self, session_id: str) -> None:
        with self.lock:
            self.engine.store.discard(("named", session_id))


@dataclass
class Session:
    """One browser tab's state. ``history`` holds the label maps before each stroke (for undo)."""

    id: str
    labels: torch.Tensor
    image: torch.Tensor
    dense_ms: float
    history: list = field(default_factory=list)
    strokes: int = 0
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class SessionManager:
    """Sessions by id, least recently used first, at most ``max_sessions`` of them."""

    def __init__(self, editor: EditorModel, max_sessions: int = 4, max_history: int = 64):
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
        self.editor = editor
        self.max_sessions = max_sessions
        self.max_history = max_history
        self._sessions: "collections.OrderedDict[str, Session]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._sessions)

    def create(self) -> tuple[Session, EditResult]:
        """A new session on the initial scene: its slot recorded, its dense latency measured. The
        least recently used sessions past ``max_sessions`` are evicted first, so the new slot's
        memory is not added on top of a full table."""
        self._evict(self.max_sessions - 1)
        session_id = secrets.token_hex(16)
        labels = self.editor.initial_labels()
        result = self.editor.record(session_id, labels)
        dense_ms = self.editor.dense_latency_ms()
        session = Session(session_id, labels, result.image, dense_ms)
        with self._lock:
            self._sessions[session_id] = session
        self._evict(self.max_sessions)      # sessions created meanwhile by other requests
        return session, result

    def _evict(self, keep: int) -> None:
        with self._lock:
            victims = []
            while len(self._sessions) > keep:
                victims.append(self._sessions.popitem(last=False)[1])
        for victim in victims:
            self._close(victim)

    def get(self, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                raise SessionNotFound(session_id)
            self._sessions.move_to_end(session_id)
            return session

    def delete(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            raise SessionNotFound(session_id)
        self._close(session)

    def _close(self, session: Session) -> None:
        with session.lock:          # waits for a request in flight on it to finish
            session.closed = True
            self.editor.drop(session.id)

    # -- edits (each under the session's lock) ---------------------------------------------------
    def _checked(self, session: Session) -> None:
        if session.closed:
            raise SessionNotFound(session.id)

    def stroke(self, session_id: str, mask: torch.Tensor, cls: int) -> EditResult:
        session = self.get(session_id)
        with session.lock:
            self._checked(session)
            labels = session.labels.clone()
            labels[mask] = cls
            result = self.editor.edit(session.id, labels)
            session.history.append(session.labels)
            del session.history[:-self.max_history]
            session.labels, session.image = labels, result.image
            session.strokes += 1
            return result

    def undo(self, session_id: str) -> EditResult:
        session = self.get(session_id)
        with session.lock:
            self._checked(session)
            if not session.history:
                raise NothingToUndo("nothing to undo")
            previous = session.history[-1]
            result = self.editor.edit(session.id, previous)   # mask: the undone stroke's difference
            session.history.pop()
            session.labels, session.image = previous, result.image
            session.strokes += 1
            return result

    def reset(self, session_id: str) -> EditResult:
        session = self.get(session_id)
        with session.lock:
            self._checked(session)
            labels = self.editor.initial_labels()
            result = self.editor.record(session.id, labels)    # a fresh recording: exactly dense
            session.history.clear()
            session.labels, session.image = labels, result.image
            session.strokes += 1
            return result
