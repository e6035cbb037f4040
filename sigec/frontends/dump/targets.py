"""What ``sigec dump`` and ``sigec bench`` work on: a TARGET (a factory or a ``.pt2`` file) with its
example inputs, the edit mask (a PNG / ``.npy`` file, or an ellipse), and the errors the CLI reports."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import logging
import os
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils import _pytree as pytree

import sigec


class CliError(ValueError):
    """A problem with what the user gave the command line; its message is one line (exit 1)."""


class UsageError(CliError):
    """A wrong combination of options (exit 2, as argparse's own errors)."""


# -- targets ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Target:
    """A loaded TARGET: the model (``nn.Module`` or ``ExportedProgram``) and its example inputs."""

    spec: str
    model: Any
    args: tuple
    kwargs: dict

    @property
    def is_program(self) -> bool:
        return isinstance(self.model, torch.export.ExportedProgram)

    def dense_callable(self) -> Callable:
        """The model as a plain callable (an exported program's ``module()``)."""
        return self.model.module() if self.is_program else self.model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


@contextlib.contextmanager
def _quiet_logger(name: str):
    """Silence a logger that prints tracebacks as warnings (``torch.export.load`` does)."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _load_program(spec: str) -> Target:
    path = Path(spec)
    if not path.exists():
        raise CliError(f"TARGET {spec!r}: no such file")
    if path.is_dir():
        raise CliError(f"TARGET {spec!r} is a directory, not a torch.export program (.pt2)")
    if not zipfile.is_zipfile(path):
        raise CliError(f"TARGET {spec!r} is not a torch.export program (.pt2): not a zip archive")
    with zipfile.ZipFile(path) as archive:
        if not any(name.endswith("archive_format") for name in archive.namelist()):
            raise CliError(f"TARGET {spec!r} is not a torch.export program (.pt2): the archive has no "
                           "'archive_format' record (a torch.save checkpoint? save with torch.export.save)")
    try:
        with _quiet_logger("torch.export"):
            program = torch.export.load(str(path))
    except Exception as exc:
        raise CliError(f"TARGET {spec!r} could not be loaded as a torch.export program: "
                       f"{_first_line(exc)}") from exc
    if not isinstance(program, torch.export.ExportedProgram):
        raise CliError(f"TARGET {spec!r} is not a torch.export program (.pt2): loaded a "
                       f"{type(program).__name__}")
    args, kwargs = program.example_inputs or ((), {})
    return Target(spec, program, tuple(args), dict(kwargs or {}))


def _import_module(spec: str, module_name: str):
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise CliError(f"cannot import {module_name!r} from TARGET {spec!r}: no such file")
        name = "_sigec_target_" + path.stem.replace("-", "_")
        file_spec = importlib.util.spec_from_file_location(name, path)
        if file_spec is None or file_spec.loader is None:
            raise CliError(f"cannot import {module_name!r} from TARGET {spec!r}: not a Python file")
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[name] = module
        try:
            file_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise CliError(f"importing {module_name!r} from TARGET {spec!r} failed: {_first_line(exc)}") from exc
        return module
    # as `python -m` and most app runners do: modules of the working directory are importable
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"cannot import module {module_name!r} from TARGET {spec!r}: {exc}") from exc
    except Exception as exc:
        raise CliError(f"importing module {module_name!r} from TARGET {spec!r} failed: "
                       f"{_first_line(exc)}") from exc


def _load_factory(spec: str) -> Target:
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise CliError(f"TARGET {spec!r} must be package.module:factory or a .pt2 file")
    module = _import_module(spec, module_name)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CliError(f"module {module_name!r} has no attribute {attr!r} (TARGET {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CliError(f"{attr!r} in module {module_name!r} is not callable (TARGET {spec!r}); it must be "
                       "a factory returning (model, args) or (model, args, kwargs)")
    try:
        result = obj()
    except Exception as exc:
        raise CliError(f"factory {spec!r} raised {_first_line(exc)}") from exc
    return _target_from_result(spec, result)


def _target_from_result(spec: str, result: Any) -> Target:
    expected = "(model, args) or (model, args, kwargs)"
    if isinstance(result, torch.export.ExportedProgram):
        args, kwargs = result.example_inputs or ((), {})
        return Target(spec, result, tuple(args), dict(kwargs or {}))
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise CliError(f"factory {spec!r} must return {expected}, got {type(result).__name__}")
    model, args = result[0], result[1]
    kwargs = result[2] if len(result) == 3 else None
    if not isinstance(model, (torch.nn.Module, torch.export.ExportedProgram)):
        raise CliError(f"factory {spec!r} returned a {type(model).__name__} as the model; expected a "
                       "torch.nn.Module or an ExportedProgram")
    if isinstance(args, torch.Tensor):
        args = (args,)
    if not isinstance(args, (tuple, list)):
        raise CliError(f"factory {spec!r} returned {type(args).__name__} as args; expected a tensor or a tuple")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise CliError(f"factory {spec!r} returned {type(kwargs).__name__} as kwargs; expected a dict")
    if isinstance(model, torch.nn.Module):
        model.eval()
    return Target(spec, model, tuple(args), dict(kwargs or {}))


def load_target(spec: str) -> Target:
    """Load ``package.module:factory``, ``path/file.py:factory`` or a ``.pt2`` export program."""
    if spec.endswith(".py") and ":" not in spec:
        raise CliError(f"TARGET {spec!r} is a Python file; name its factory too: {spec}:FACTORY")
    if os.path.isfile(spec) or (":" not in spec and (spec.endswith(".pt2") or os.path.exists(spec))):
        return _load_program(spec)
    if ":" in spec:
        return _load_factory(spec)
    if spec.endswith(".pt2") or os.sep in spec or "/" in spec:
        raise CliError(f"TARGET {spec!r}: no such file")
    raise CliError(f"TARGET {spec!r} must be package.module:factory (a callable returning "
                   "(model, args) or (model, args, kwargs)) or a .pt2 file from torch.export.save")


def compile_target(target: Target, policy: str = "sige", block_size: Optional[int] = None):
    """``sigec.compile`` the target with its example inputs."""
    return sigec.compile(target.model, target.args, target.kwargs or None, policy=policy,
                         block_size=block_size)


# -- masks ------------------------------------------------------------------------------------
def read_mask_file(path: str) -> torch.Tensor:
    """An H x W bool mask from a PNG (or any image PIL reads; light pixels are edited) or a
    ``.npy`` array (bool, or numbers: values above 0.5 are edited)."""
    p = Path(path)
    if not p.exists():
        raise CliError(f"mask file {path!r} does not exist")
    if p.is_dir():
        raise CliError(f"mask {path!r} is a directory, not a PNG or .npy file")
    if p.suffix.lower() == ".npy":
        import numpy as np

        try:
            arr = np.load(p, allow_pickle=False)
        except Exception as exc:
            raise CliError(f"cannot read mask {path!r} as a .npy array: {_first_line(exc)}") from exc
        if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
            arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:-1])
        if arr.ndim != 2:
            raise CliError(f"mask {path!r} has shape {tuple(arr.shape)}; expected a 2-D H x W array")
        if arr.dtype == np.bool_:
            return torch.from_numpy(arr.copy())
        if not np.issubdtype(arr.dtype, np.number):
            raise CliError(f"mask {path!r} has dtype {arr.dtype}; expected bool or numbers")
        return torch.from_numpy(np.asarray(arr, dtype=np.float64) > 0.5)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as img:
            gray = img.convert("L")
    except (UnidentifiedImageError, OSError) as exc:
        raise CliError(f"cannot read mask {path!r}: not a PNG image or a .npy array") from exc
    import numpy as np

    return torch.from_numpy(np.asarray(gray) > 127)


def resolve_mask(engine, mask_path: Optional[str], fraction: float,
                 preloaded: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, str]:
    """The edit mask at the engine's input resolution and a description of where it came from."""
    res = tuple(engine.context.input_resolution)
    if mask_path is not None:
        mask = preloaded if preloaded is not None else read_mask_file(mask_path)
        if tuple(mask.shape) != res:
            raise CliError(f"mask {mask_path!r} is {mask.shape[0]}x{mask.shape[1]} (height x width) but the "
                           f"model's input resolution is {res[0]}x{res[1]}")
        return mask.bool(), f"file {mask_path}"
    from sigec.frontends.edits import ellipse_mask

    return ellipse_mask(res[0], res[1], fraction), f"ellipse (--mask-fraction {fraction:g})"


def flat_inputs(target: Target) -> tuple[list, Any]:
    """The target's example inputs as the flat leaves the engine sees, and their spec."""
    return pytree.tree_flatten((tuple(target.args), dict(target.kwargs)))
