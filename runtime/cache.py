"""Cache slots: what one recorded run left behind, keyed by its non-spatial inputs.

A diffusion edit runs many steps; each step (timestep, text embedding) has its own slot. The key
is a fingerprint of the non-spatial inputs' values, or a name the user gives. A store has an
optional byte budget; past it the least recently used slot is evicted (``on_full="evict"``) or
``CacheBudgetError`` is raised (``on_full="raise"``) - never a silent wrong result. An evicted slot is
gone: the next call for its key records again (or, with an explicit ``mask=``, raises), it is never
served from another slot.

**Host offload.** With ``offload="cpu"`` a slot lives on the host between uses: ``put`` copies it
there, ``checkout(key, device)`` copies it to the compute device for one call, and ``checkin(key)``
copies it back (including what the call wrote in place), dropping the device copy. The copies are
real copies even when host and device are the same (a CPU-only machine), so the in-place updates
and their write-back are exercised everywhere. The budget counts the slots' bytes wherever they are.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Any, Hashable, Optional

import torch


class CacheBudgetError(RuntimeError):
    pass


def fingerprint(values: list) -> str:
    """Stable digest of tensors and Python values (shape, dtype and bytes of each tensor)."""
    h = hashlib.sha1()
    for v in values:
        if isinstance(v, torch.Tensor):
            h.update(f"{tuple(v.shape)}|{v.dtype}|".encode())
            t = v.detach().to("cpu").contiguous().reshape(-1)  # 1-D: 0-dim tensors cannot be viewed as bytes
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(v).encode())
        h.update(b";")
    return h.hexdigest()


@dataclasses.dataclass
class Slot:
    """One recorded run: its spatial inputs (the baseline for differences), the tensors the
    incremental graph reads, the outputs, and the fingerprint of its non-spatial inputs."""

    spatial_inputs: list
    caches: list
    outputs: list
    nonspatial_fingerprint: str
    #: ``(data_ptr, version)`` of every watched parameter and buffer when the slot was recorded
    state_versions: tuple = ()
    #: blocks an uncommitted edit overwrote in the in-place caches: ``(cache position, block
    #: indices, block size, the recorded blocks)`` each; restored before the slot's next run
    dirty: Optional[list] = None
    #: indices of the engine plans whose caches all match the baseline (``None``: every plan).
    #: A commit made by one plan leaves stale the caches that plan does not maintain.
    fresh_plans: Optional[frozenset] = None
    #: ``"device"`` (where it was computed, or checked out to) or ``"host"`` (offloaded)
    location: str = "device"

    def tensors(self) -> list:
        """Every tensor the slot holds (the saved blocks of ``dirty`` included)."""
        saved = [t for entry in self.dirty or [] for t in entry if isinstance(t, torch.Tensor)]
        return [t for t in self.spatial_inputs + self.caches + self.outputs + saved if isinstance(t, torch.Tensor)]

    def move(self, device: "torch.device | str", location: str) -> int:
        """Replace every tensor by a copy on ``device`` (aliases stay aliases); returns the bytes moved."""
        device = torch.device(device)
        copies: dict[int, torch.Tensor] = {}

        def copy(t):
            if not isinstance(t, torch.Tensor):
                return t
            if id(t) not in copies:
                if device.type == "cpu" and t.device.type == "cuda":  # pinned host memory: faster transfers back
                    copies[id(t)] = torch.empty_like(t, device="cpu", pin_memory=True).copy_(t)
                else:
                    copies[id(t)] = t.to(device, copy=True, non_blocking=t.is_pinned())
            return copies[id(t)]

        self.spatial_inputs = [copy(t) for t in self.spatial_inputs]
        self.caches = [copy(t) for t in self.caches]
        self.outputs = [copy(t) for t in self.outputs]
        if self.dirty is not None:
            self.dirty = [tuple(copy(t) for t in entry) for entry in self.dirty]
        self.location = location
        return sum(t.numel() * t.element_size() for t in copies.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.spatial_inputs + self.caches + self.outputs
                   if isinstance(t, torch.Tensor))


class SlotStore:
    """Slots by key, least recently used first; a byte budget with a rule past it; optional host
    offload (``offload="cpu"``; ``bytes_offloaded`` and ``bytes_fetched`` count the copies)."""

    def __init__(self, budget_bytes: Optional[int] = None, on_full: str = "evict", offload: Optional[str] = None):
        if on_full not in ("evict", "raise"):
            raise ValueError(f"on_full must be 'evict' or 'raise', got {on_full!r}")
        self.budget_bytes = budget_bytes
        self.on_full = on_full
        self.offload = offload
        self.bytes_offloaded = 0
        self.bytes_fetched = 0
        self._slots: "collections.OrderedDict[Hashable, Slot]" = collections.OrderedDict()

    @property
    def offload(self) -> Optional[str]:
        return self._offload

    @offload.setter
    def offload(self, device: Optional[str]) -> None:
        if device not in (None, "cpu"):
            raise ValueError(f"offload must be None (slots stay where they were computed) or 'cpu' (slots live "
                             f"on the host between uses), got {device!r}")
        self._offload = device
        for slot in getattr(self, "_slots", {}).values():
            self._to_host(slot)

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._slots

    def keys(self) -> list:
        return list(self._slots)

    def items(self) -> list:
        """``(key, slot)`` pairs, least recently used first, without changing that order."""
        return list(self._slots.items())

    def get(self, key: Hashable) -> Optional[Slot]:
        slot = self._slots.get(key)
        if slot is not None:
            self._slots.move_to_end(key)
        return slot

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self._slots.values())

    def _to_host(self, slot: Slot) -> None:
        if self._offload is not None and slot.location != "host":
            self.bytes_offloaded += slot.move(self._offload, "host")

    def checkout(self, key: Hashable, device: "torch.device | str") -> Optional[Slot]:
        """``get(key)``, with an offloaded slot copied to ``device`` for one use (``checkin`` ends it)."""
        slot = self.get(key)
        if slot is not None and slot.location == "host":
            self.bytes_fetched += slot.move(device, "device")
        return slot

    def checkin(self, key: Hashable) -> None:
        """End a use: an offloading store copies the slot back to the host (no-op otherwise)."""
        slot = self._slots.get(key)
        if slot is not None:
            self._to_host(slot)

    def put(self, key: Hashable, slot: Slot) -> None:
        self._slots.pop(key, None)
        if self.budget_bytes is not None:
            need = slot.nbytes()
            if need > self.budget_bytes:
                raise CacheBudgetError(f"one slot needs {need} bytes, more than the budget of {self.budget_bytes}")
            while self._slots and self.nbytes() + need > self.budget_bytes:
                if self.on_full == "raise":
                    raise CacheBudgetError(f"recording slot {key!r} ({need} bytes) would exceed the cache budget "
                                           f"of {self.budget_bytes} bytes ({len(self)} slots, {self.nbytes()} "
                                           "bytes held); raise the budget, clear() the engine or use on_full='evict'")
                self._slots.popitem(last=False)
        self._to_host(slot)
        self._slots[key] = slot

    def discard(self, key: Hashable) -> None:
        """Drop the slot ``key`` if held."""
        self._slots.pop(key, None)

    def clear(self) -> None:
        self._slots.clear()

    def describe(self) -> list[dict[str, Any]]:
        return [{"slot": k, "bytes": s.nbytes()} for k, s in self._slots.items()]
