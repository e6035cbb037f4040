"""Measured kernel costs: what the partition pass weighs sparse against dense with.

``KernelCosts`` holds the seconds one unit of work takes in each kind of kernel an incremental
graph runs. ``measure`` times small instances of them on the device at hand (about a second);
``machine_costs`` returns this machine's figures, measured once and cached on disk
(``cache_file()``), keyed by processor or GPU, threads, torch version, kernels (native or
reference) and dtype, so compiling twice plans the same. ``sigec costs --remeasure`` renews them.

Why measure: whether a layer pays to run sparse depends on ratios that differ between machines
and between layers. A wide low-resolution convolution is bound by streaming its weights, which
a sparse run reads as often as a dense one; a gather costs memory traffic, not arithmetic; and
each runtime op has a fixed dispatch cost that dominates a tiny map.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

log = logging.getLogger("sigec.ir.costs")


@dataclasses.dataclass(frozen=True)
class KernelCosts:
    """Seconds per unit of work; a convolution costs ``weight bytes * *_weight_byte + MACs * *_mac``.

    Attributes:
        dense_mac: one multiply-accumulate of a dense convolution over a whole feature map.
        dense_weight_byte: one byte of weights of a dense convolution, paid once per call (the
            library reorders the weights on every call): what makes a wide layer on a small map
            cost more than its MACs.
        sparse_mac: one multiply-accumulate of ``sigec.conv_windows`` on gathered windows.
        sparse_weight_byte: one byte of weights of ``sigec.conv_windows``, paid once per call.
        element: one element moved by a gather or a scatter (read once, written once).
        call: the fixed cost of one op call (dispatch, allocation, launch).
        source: where the figures come from.
    """

    dense_mac: float
    dense_weight_byte: float
    sparse_mac: float
    sparse_weight_byte: float
    element: float
    call: float
    source: str = "given"

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name != "source" and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"KernelCosts.{field.name} must be a positive number of seconds, got {value!r}")

    def summary(self) -> str:
        return (f"dense conv {self.dense_mac * 1e12:.2f} ps/MAC + {self.dense_weight_byte * 1e12:.0f} ps/weight byte, "
                f"sparse conv {self.sparse_mac * 1e12:.2f} ps/MAC + {self.sparse_weight_byte * 1e12:.0f} ps/weight byte, "
                f"gather/scatter {self.element * 1e9:.2f} ns/element, op call {self.call * 1e6:.1f} us ({self.source})")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], object], device: torch.device, repeats: int = 9) -> float:
    """Shortest wall time of ``fn`` after one warm-up call: other work on a shared machine only
    ever adds time, and these figures are cached for later compiles. On a GPU, the GPU time of
    ``fn`` replayed in a CUDA graph."""
    if device.type == "cuda":
        try:
            return _graph_seconds(fn, repeats)
        except RuntimeError as exc:  # an op that cannot be captured: time it eagerly
            log.info("timing eagerly, not as a CUDA graph (%s)", exc)
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def _graph_seconds(fn: Callable[[], object], repeats: int, calls: int = 10) -> float:
    """GPU seconds of one call of ``fn``, from replays of a CUDA graph of ``calls`` calls. On a GPU
    an incremental graph pays only when replayed as a CUDA graph (``sigec.core.cuda_graphs``), where an
    op costs its kernels, not the host's dispatch: that is the cost to plan with."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture (library handles, workspaces)
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return min(times)


def _block_indices(grid: int, device: torch.device) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], 1).to(device=device, dtype=torch.int64)


def _fit(small: tuple[float, float], large: tuple[float, float], weight_bytes: int) -> tuple[float, float]:
    """Per-weight-byte and per-MAC seconds from ``(seconds, MACs)`` of one weight at two sizes."""
    (t_small, m_small), (t_large, m_large) = small, large
    per_mac = max((t_large - t_small) / (m_large - m_small), t_large / m_large * 0.1)
    per_byte = max(t_small - per_mac * m_small, t_small * 0.01) / weight_bytes
    return per_byte, per_mac


def measure(device: "torch.device | str" = "cpu", dtype: torch.dtype = torch.float32) -> KernelCosts:
    """Time small instances of each kernel on ``device`` (about half a second on a CPU).

    One 512-channel 3x3 convolution runs densely on an 8x8 and a 32x32 map, and sparsely on
    the windows of 1 and of 144 4x4 blocks of a 48x48 map; two sizes separate the per-call weight
    cost from the per-MAC cost. A gather of those 144 windows gives the cost of moving an element,
    and a one-element scatter the cost of a call.
    """
    from sigec.runtime import native

    native.load()
    device = torch.device(device)
    sigec_ops = torch.ops.sigec
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    channels, side, block = 512, 48, 4
    weight, bias = rand(channels, channels, 3, 3), rand(channels)
    weight_bytes = weight.numel() * weight.element_size()
    mac_per_pixel = channels * channels * 9

    def dense(size: int) -> tuple[float, float]:
        fmap = rand(1, channels, size, size)
        return _seconds(lambda: F.conv2d(fmap, weight, bias, padding=1), device), mac_per_pixel * size * size

    fmap = rand(1, channels, side, side)
    indices = _block_indices(side // block, device)
    window = [block + 2, block + 2]

    def gather(blocks: torch.Tensor) -> torch.Tensor:
        return sigec_ops.gather(fmap, blocks, window, [block, block], [-1, -1], "constant", 0.0,
                                None, None, "none", 0.0)

    def sparse(count: int) -> tuple[float, float]:
        windows = gather(indices[:count])
        seconds = _seconds(lambda: sigec_ops.conv_windows(windows, weight, bias, [1, 1], [1, 1], 1), device)
        return seconds, mac_per_pixel * count * block * block

    dense_weight_byte, dense_mac = _fit(dense(8), dense(32), weight_bytes)
    sparse_weight_byte, sparse_mac = _fit(sparse(1), sparse(indices.shape[0]), weight_bytes)
    one, tiny = indices[:1], rand(1, 1, 1, 1)
    call = _seconds(lambda: sigec_ops.scatter_(tiny, tiny.clone(), one, [1, 1]), device, repeats=21)
    moved = indices.shape[0] * channels * window[0] * window[1]
    element = max(_seconds(lambda: gather(indices), device) - call, call * 1e-3) / moved
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else _processor()
    return KernelCosts(dense_mac, dense_weight_byte, sparse_mac, sparse_weight_byte, element, call,
                       source=f"measured on {where}, {_threads(device)}, {native.status()}")


def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _threads(device: torch.device) -> str:
    return f"{torch.get_num_threads()} threads" if device.type == "cpu" else "GPU"


def cache_file() -> Path:
    """Where the measured costs are cached: ``$SIGEC_CACHE_DIR``, else ``$XDG_CACHE_HOME/sigec``,
    else ``~/.cache/sigec``."""
    root = os.environ.get("SIGEC_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "sigec")
    return Path(root) / "kernel-costs.json"


def _key(device: torch.device, dtype: torch.dtype) -> str:
    from sigec.runtime import native

    native.load()  # the key names the kernels that run: load them before asking
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else _processor()
    return f"{where} | {_threads(device)} | torch {torch.__version__} | {native.status()} | {dtype}"


_memo: dict = {}
_lock = threading.Lock()


def machine_costs(device: "torch.device | str" = "cpu", dtype: torch.dtype = torch.float32,
                  remeasure: bool = False) -> KernelCosts:
    """This machine's kernel costs for ``device`` and ``dtype``: from the disk cache, or measured
    (and cached) on first use. ``remeasure`` measures again and replaces the cached figures."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = _key(device, dtype)
    with _lock:
        if not remeasure and key in _memo:
            return _memo[key]
        path = cache_file()
        table = _read_table(path)
        entry = None if remeasure else table.get(key)
        costs = _from_entry(entry, path) if entry is not None else None
        if costs is None:
            log.info("measuring kernel costs on %s (%s); cached in %s", device, dtype, path)
            costs = measure(device, dtype)
            table[key] = dataclasses.asdict(costs)
            _write_table(path, table)
        _memo[key] = costs
        return costs


def _read_table(path: Path) -> dict:
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring the unreadable kernel-cost cache %s (%s); measuring again", path, exc)
        return {}
    if not isinstance(table, dict):
        log.warning("ignoring the kernel-cost cache %s: not a JSON object; measuring again", path)
        return {}
    return table


def _from_entry(entry, path: Path) -> Optional[KernelCosts]:
    try:
        return KernelCosts(**entry)
    except (TypeError, ValueError) as exc:
        log.warning("ignoring a malformed entry of the kernel-cost cache %s (%s); measuring again", path, exc)
        return None


def _write_table(path: Path, table: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old table or the new one
    except OSError as exc:
        log.warning("could not cache the kernel costs in %s (%s); they will be measured again next time", path, exc)
