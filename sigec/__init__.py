"""sigec: compile PyTorch image generators into incremental engines.

``import sigec`` loads the public face (``compile``, ``backend``, ``Engine``, the errors) and the
runtime's operators. The feature packages load on first use: ``sigec.temporal``, ``sigec.tiling``,
``sigec.diffusion``, ``sigec.models``, ``sigec.costs`` (PEP 562 module ``__getattr__``).
"""
import importlib
from types import ModuleType

from sigec import runtime  # noqa: F401  (registers torch.ops.sigec.*)
from sigec.api import compile
from sigec.backend import backend
from sigec.core.capture import CaptureError
from sigec.core.engine import Engine, EngineError
from sigec.ir.settings import CompileSettings
from sigec.runtime.cache import CacheBudgetError

__version__ = "0.1.0"
__all__ = ["compile", "backend", "Engine", "EngineError", "CaptureError", "CacheBudgetError", "CompileSettings",
           "__version__"]

#: submodules loaded on first attribute access, by the module that holds them
_LAZY = {"temporal": "sigec.temporal", "tiling": "sigec.tiling", "diffusion": "sigec.diffusion",
         "models": "sigec.models", "costs": "sigec.ir.costs", "cuda_graphs": "sigec.core.cuda_graphs"}


def __getattr__(name: str) -> ModuleType:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        globals()[name] = module  # later lookups skip this function
        return module
    raise AttributeError(f"module 'sigec' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
