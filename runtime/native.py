"""Loading of the native CPU kernels (``csrc/cpu_kernels.cpp``).

The kernels are compiled just in time with the user's installed torch (``torch.utils.
cpp_extension``, no network, one translation unit of light headers: about 20 s on 2 cores) and
cached in torch's extension directory, so later processes only load the library. Loading
registers them as the CPU implementations of the ``torch.ops.sigec.*`` ops that
``runtime/ops.py`` defines; ops without a native kernel keep their pure-PyTorch one.

When no compiler is available (or ``SIGEC_NATIVE=0``), sigec runs on the reference kernels and
says so in one warning. ``reference_kernels()`` switches back to the reference kernels for a
block of code, which is how tests and benchmarks compare the two.
"""
from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch

from sigec.runtime import ops

log = logging.getLogger("sigec.native")

_SOURCES = ("cpu_kernels.cpp",)
_NAME = "sigec_cpu_kernels"

_lock = threading.Lock()
_state: dict = {"tried": False, "loaded": False, "error": None}


def _sources() -> Optional[list[str]]:
    """The C++ sources: ``csrc/``, installed as the data package ``sigec.csrc``."""
    try:
        directory = Path(str(importlib.resources.files("sigec.csrc")))
    except ModuleNotFoundError:
        return None
    if all((directory / s).is_file() for s in _SOURCES):
        return [str(directory / s) for s in _SOURCES]
    return None


def _build_and_load(verbose: bool) -> None:
    from torch.utils import cpp_extension

    sources = _sources()
    if sources is None:
        raise FileNotFoundError(f"the C++ sources {_SOURCES} are not installed (package sigec.csrc)")
    flags = ["-O3", "-fopenmp", "-DNDEBUG"]
    start = time.perf_counter()
    # is_python_module=False: a plain library that registers its kernels with the dispatcher
    # when loaded (no pybind11 module, which keeps the build short)
    cpp_extension.load(_NAME, sources, extra_cflags=flags, extra_ldflags=["-fopenmp"],
                       is_python_module=False, verbose=verbose)
    log.info("native CPU kernels ready (%.1f s, including any build)", time.perf_counter() - start)


def load(verbose: bool = False) -> bool:
    """Build (once) and load the native CPU kernels; return whether they are active.

    Safe to call many times. A failed build is reported once, as a warning, and sigec keeps
    running on the reference kernels.
    """
    with _lock:
        if _state["tried"]:
            return _state["loaded"]
        _state["tried"] = True
        if os.environ.get("SIGEC_NATIVE", "1") == "0":
            _state["error"] = "disabled by SIGEC_NATIVE=0"
            log.info("native CPU kernels disabled by SIGEC_NATIVE=0")
            return False
        try:
            _build_and_load(verbose)
        except Exception as exc:  # no compiler, no ninja, missing headers, ...
            _state["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            warnings.warn(f"sigec: the native CPU kernels could not be built ({_state['error']}); running on the "
                          "pure-PyTorch reference kernels, which are correct but slower. Install a C++ compiler "
                          "and ninja (pip install ninja) to build them, or set SIGEC_NATIVE=0 to silence this.",
                          RuntimeWarning, stacklevel=2)
            return False
        _state["loaded"] = True
        return True


def available() -> bool:
    """Whether the native CPU kernels are loaded (without trying to build them)."""
    return _state["loaded"]


def status() -> str:
    """One line for reports and the CLI."""
    if _state["loaded"]:
        return "native CPU kernels (csrc/cpu_kernels.cpp)"
    if _state["error"]:
        return f"pure-PyTorch reference kernels ({_state['error']})"
    return "pure-PyTorch reference kernels (native kernels not loaded yet)"


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Run the ``sigec`` ops on their pure-PyTorch reference kernels inside the block.

    The reference kernels are registered on top of the native ones for the CPU and removed on
    exit, which brings the native kernels back.
    """
    if not _state["loaded"]:
        yield
        return
    lib = torch.library.Library("sigec", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
            for name, fn in ops.REFERENCE_KERNELS.items():
                lib.impl(name, fn, "CPU")
        yield
    finally:
        lib._destroy()


def main() -> int:
    """``python -m sigec.runtime.native``: build and load the kernels, print the outcome."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ok = load(verbose=os.environ.get("SIGEC_NATIVE_VERBOSE") == "1")
    print(status())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
