"""Loading of the native CPU kernels (``csrc/cpu_kernels.cpp``).

The kernels are compiled just in time with the user's installed torch (``torch.utils.
cpp_extension``, no network, one translation unit of light headers: about 20 s on 2 cores) and
cached in torch's extension directory, so later processes only load the library. Loading
registers them as the CPU implementations of the ``torch.ops.sigec.*`` ops that
``runtime/ops.py`` defines; ops without a native kernel keep their pure-PyTorch one.

When no compiler is available (or ``SIGEC_NATIVE=0``), sigec runs on the reference kernels and
says so in one warning. ``reference_kernels()`` switches back to the reference kernels for a
block of code, which is how tests and benchmarks compare the two.

CUDA (``csrc/cuda_kernels.cu``): where torch is a CUDA build with a visible GPU and nvcc is found,
``load()`` also builds (once, about a minute) and loads the CUDA kernels, registered as the CUDA
implementations of the same ops. Anywhere else this step does nothing and says nothing; a failed
CUDA build warns once and CUDA tensors run on the reference kernels. ``SIGEC_CUDA=0`` skips it.
``check_cuda_compile()`` (``python -m sigec.runtime.native --check-cuda``) compiles the CUDA source
to an object file with nvcc, with the flags of the JIT build, on any machine with nvcc: no GPU and
no CUDA build of torch needed.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.resources
import logging
import os
import shutil
import subprocess
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch

from sigec.runtime import attention, ops, token_ops

log = logging.getLogger("sigec.native")

_SOURCES = ("cpu_kernels.cpp",)
_HEADER = "kernel_common.h"  # shared with the CUDA kernels
_NAME = "sigec_cpu_kernels"

_CUDA_SOURCE = "cuda_kernels.cu"
_CUDA_NAME = "sigec_cuda_kernels"
# Toolchains that link libstdc++ statically into every shared library (seen on a GPU machine's
# /opt/gcc) give each extension a private libstdc++ whose symbols, torch loading extensions with
# RTLD_GLOBAL, get mixed with other copies' (std::locale facet ids are STB_GNU_UNIQUE): formatting
# a number into an error message then crashed. Hiding the symbols of linked static archives keeps
# each copy private; where libstdc++ is shared, as usual, the flag changes nothing.
LINK_FLAGS = ("-Wl,--exclude-libs,ALL",)

_lock = threading.Lock()
_state: dict = {"tried": False, "loaded": False, "error": None}
_cuda_state: dict = {"tried": False, "loaded": False, "error": None}


def _source_directory() -> Optional[Path]:
    try:
        return Path(str(importlib.resources.files("sigec.csrc")))
    except ModuleNotFoundError:
        return None


def _sources() -> Optional[list[str]]:
    """The C++ sources: ``csrc/``, installed as the data package ``sigec.csrc``."""
    directory = _source_directory()
    if directory is None:
        return None
    if all((directory / s).is_file() for s in _SOURCES):
        return [str(directory / s) for s in _SOURCES]
    return None


def cuda_source() -> Optional[Path]:
    """``csrc/cuda_kernels.cu`` as installed (``None`` when it is not)."""
    directory = _source_directory()
    if directory is None or not (directory / _CUDA_SOURCE).is_file():
        return None
    return directory / _CUDA_SOURCE


def _build_and_load(verbose: bool) -> None:
    from torch.utils import cpp_extension

    sources = _sources()
    if sources is None:
        raise FileNotFoundError(f"the C++ sources {_SOURCES} are not installed (package sigec.csrc)")
    # -fno-trapping-math lets the activation loops' selects vectorize (no FP exceptions are used)
    flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-DNDEBUG"]
    ldflags = ["-fopenmp", *LINK_FLAGS]
    start = time.perf_counter()
    # is_python_module=False: a plain library that registers its kernels with the dispatcher
    # when loaded (no pybind11 module, which keeps the build short)
    # torch's build cache hashes the sources but not the headers they include: name the library
    # after a hash of every csrc file it reads and of the flags, so a changed header rebuilds it
    shared = Path(sources[0]).parent / _HEADER
    digest = hashlib.sha256(b"".join(Path(f).read_bytes() for f in [*sources, str(shared)])
                            + " ".join(flags + ldflags).encode()).hexdigest()[:12]
    cpp_extension.load(f"{_NAME}_{digest}", sources, extra_cflags=flags, extra_ldflags=ldflags,
                       is_python_module=False, verbose=verbose)
    log.info("native CPU kernels ready (%.1f s, including any build)", time.perf_counter() - start)


def load(verbose: bool = False) -> bool:
    """Build (once) and load the native CPU kernels; return whether they are active.

    Safe to call many times. A failed build is reported once, as a warning, and sigec keeps
    running on the reference kernels. Where CUDA applies (see ``load_cuda``), the CUDA kernels
    are built and loaded too.
    """
    loaded = _load_cpu(verbose)
    if torch.cuda.is_available():  # cheap, and False on CPU builds of torch: nothing else runs
        load_cuda(verbose)
    return loaded


def _load_cpu(verbose: bool) -> bool:
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


# ---------------------------------------------------------------------------------------------
# CUDA


def cuda_unavailable_reason() -> Optional[str]:
    """Why the CUDA kernels cannot be built and used here, or ``None`` when they can."""
    if torch.version.cuda is None:
        return "torch is not a CUDA build"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None:
        return "nvcc was not found (install the CUDA toolkit or set CUDA_HOME)"
    if cuda_source() is None:
        return f"the CUDA source {_CUDA_SOURCE} is not installed (package sigec.csrc)"
    return None


def _build_and_load_cuda(verbose: bool) -> None:
    from torch.utils import cpp_extension

    start = time.perf_counter()
    # the architectures of the visible GPUs (TORCH_CUDA_ARCH_LIST overrides), as torch does
    source = cuda_source()
    cflags, cuda_cflags, ldflags = ["-O3"], ["-O3"], list(LINK_FLAGS)
    # the library is named after its sources and flags: a changed flag builds a new one
    digest = hashlib.sha256(source.read_bytes() + (source.parent / _HEADER).read_bytes()
                            + " ".join([*cflags, *cuda_cflags, *ldflags]).encode()).hexdigest()[:12]
    cpp_extension.load(f"{_CUDA_NAME}_{digest}", [str(source)], extra_cflags=cflags, extra_cuda_cflags=cuda_cflags,
                       extra_ldflags=ldflags, is_python_module=False, verbose=verbose)
    log.info("CUDA kernels ready (%.1f s, including any build)", time.perf_counter() - start)


def load_cuda(verbose: bool = False) -> bool:
    """Build (once) and load the CUDA kernels where a CUDA torch, a GPU and nvcc exist.

    Returns whether they are active. Without CUDA this does nothing (no warning: CPU-only
    installs are normal). A failed build warns once; CUDA tensors then run on the reference
    kernels. ``SIGEC_NATIVE=0`` or ``SIGEC_CUDA=0`` skip the build.
    """
    with _lock:
        if _cuda_state["tried"]:
            return _cuda_state["loaded"]
        _cuda_state["tried"] = True
        reason = cuda_unavailable_reason()
        if reason is None and "0" in (os.environ.get("SIGEC_NATIVE", "1"), os.environ.get("SIGEC_CUDA", "1")):
            reason = "disabled by SIGEC_NATIVE=0 or SIGEC_CUDA=0"
        if reason is not None:
            _cuda_state["error"] = reason
            log.info("CUDA kernels not built: %s", reason)
            return False
        try:
            _build_and_load_cuda(verbose)
        except Exception as exc:  # nvcc or host compiler errors, missing CUDA headers, ...
            lines = str(exc).strip().splitlines()
            _cuda_state["error"] = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
            warnings.warn(f"sigec: the CUDA kernels could not be built ({_cuda_state['error']}); CUDA tensors run on "
                          "the pure-PyTorch reference kernels, which are correct but slower. Run `python -m "
                          "sigec.runtime.native --check-cuda` for nvcc's output, or set SIGEC_CUDA=0 to silence this.",
                          RuntimeWarning, stacklevel=2)
            return False
        _cuda_state["loaded"] = True
        return True


def cuda_available() -> bool:
    """Whether the CUDA kernels are loaded (without trying to build them)."""
    return _cuda_state["loaded"]


def cuda_status() -> str:
    """One line on the CUDA kernels, for reports and the CLI."""
    if _cuda_state["loaded"]:
        return "CUDA kernels (csrc/cuda_kernels.cu)"
    if _cuda_state["error"]:
        return f"no CUDA kernels ({_cuda_state['error']})"
    return "no CUDA kernels (not loaded yet)"


class CudaCompileError(RuntimeError):
    """nvcc rejected ``csrc/cuda_kernels.cu``; the message holds its output."""


def _nvcc() -> Optional[str]:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and Path(home, "bin", "nvcc").is_file():
            return str(Path(home, "bin", "nvcc"))
    found = shutil.which("nvcc")
    if found:
        return found
    return "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None


def _cuda_check_includes(build: Path) -> list[str]:
    """Include flags of the JIT build. A CPU wheel of torch ships the c10/cuda headers but not the
    one CMake generates for them, so an equivalent is written into the build folder."""
    from torch.utils import cpp_extension

    flags = []
    torch_include = Path(cpp_extension.include_paths()[0])
    if not (torch_include / "c10/cuda/impl/cuda_cmake_macros.h").is_file():
        shim = build / "include"
        header = shim / "c10/cuda/impl/cuda_cmake_macros.h"
        header.parent.mkdir(parents=True, exist_ok=True)
        header.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        flags += ["-isystem", str(shim)]
    for path in cpp_extension.include_paths():
        flags += ["-isystem", path]
    return flags


def check_cuda_compile(arch: str = "90", verbose: bool = False) -> Path:
    """Compile ``csrc/cuda_kernels.cu`` to an object file with nvcc; return its path.

    Uses the flags of the JIT build (torch's nvcc flags, C++20, -O3) for one architecture
    (``arch="90"``: H100). Needs nvcc only: no GPU, no CUDA build of torch. The object is kept
    in torch's extension folder under a hash of the source, flags, nvcc and torch versions, so
    an unchanged source is checked once. Raises ``CudaCompileError`` with nvcc's output.
    """
    from torch.utils import cpp_extension

    nvcc = _nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc was not found: install the CUDA toolkit, or set CUDA_HOME")
    source = cuda_source()
    if source is None:
        raise FileNotFoundError(f"the CUDA source {_CUDA_SOURCE} is not installed (package sigec.csrc)")
    build = Path(cpp_extension.get_default_build_root()) / "sigec_cuda_check"
    build.mkdir(parents=True, exist_ok=True)
    flags = [*cpp_extension.COMMON_NVCC_FLAGS, "-std=c++20", "-O3", "--compiler-options", "-fPIC",
             f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-DTORCH_EXTENSION_NAME={_CUDA_NAME}",
             "-DTORCH_API_INCLUDE_EXTENSION_H",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             *_cuda_check_includes(build)]
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    texts = [source.read_text(), (source.parent / _HEADER).read_text()]
    key = hashlib.sha256("\0".join([*texts, *flags, version, torch.__version__]).encode()).hexdigest()[:16]
    obj = build / f"cuda_kernels-sm{arch}-{key}.o"
    if obj.is_file():
        log.info("%s: unchanged since it compiled (%s)", source.name, obj)
        return obj
    command = [nvcc, *flags, "-c", str(source), "-o", str(obj.with_suffix(".tmp.o"))]
    if verbose:
        print(" ".join(command))
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise CudaCompileError(f"nvcc failed on {source} (exit {result.returncode}):\n{result.stdout}{result.stderr}")
    if result.stderr.strip():
        log.warning("nvcc warnings for %s:\n%s", source.name, result.stderr)
    obj.with_suffix(".tmp.o").replace(obj)
    log.info("%s compiled for sm_%s in %.1f s: %s", source.name, arch, time.perf_counter() - start, obj)
    return obj


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

    The reference kernels are registered on top of the native ones for the CPU (and CUDA, when
    the CUDA kernels are loaded) and removed on exit, which brings the native kernels back.
    """
    if not _state["loaded"] and not _cuda_state["loaded"]:
        yield
        return
    lib = torch.library.Library("sigec", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
            if _state["loaded"]:
                for name, fn in {**ops.REFERENCE_KERNELS, **attention.REFERENCE_KERNELS}.items():
                    lib.impl(name, fn, "CPU")
            if _cuda_state["loaded"]:
                for name, fn in {**ops.REFERENCE_KERNELS, **token_ops.REFERENCE_KERNELS}.items():
                    lib.impl(name, fn, "CUDA")
        yield
    finally:
        lib._destroy()


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m sigec.runtime.native``: build and load the kernels, print the outcome.

    ``--check-cuda`` instead compiles the CUDA kernels with nvcc (no GPU needed).
    """
    parser = argparse.ArgumentParser(prog="python -m sigec.runtime.native",
                                     description="Build and load sigec's native kernels.")
    parser.add_argument("--check-cuda", action="store_true",
                        help="compile csrc/cuda_kernels.cu to an object file with nvcc (no GPU needed) and exit")
    parser.add_argument("--arch", default="90", help="with --check-cuda: the SM architecture (default 90, H100)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    verbose = os.environ.get("SIGEC_NATIVE_VERBOSE") == "1"
    if args.check_cuda:
        try:
            obj = check_cuda_compile(args.arch, verbose=verbose)
        except (CudaCompileError, FileNotFoundError) as exc:
            print(f"CUDA compile check failed: {exc}")
            return 1
        print(f"CUDA kernels compile for sm_{args.arch}: {obj}")
        return 0
    ok = load(verbose=verbose)
    print(status())
    if torch.cuda.is_available():
        print(cuda_status())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
