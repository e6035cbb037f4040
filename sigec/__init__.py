"""sigec: compile PyTorch image generators into incremental engines."""
from sigec import runtime  # noqa: F401  (registers torch.ops.sigec.*)
from sigec.api import compile
from sigec.backend import backend
from sigec.capture import CaptureError
from sigec.engine import Engine, EngineError
from sigec.runtime.cache import CacheBudgetError
from sigec.settings import CompileSettings

__version__ = "0.1.0"
__all__ = ["compile", "backend", "Engine", "EngineError", "CaptureError", "CacheBudgetError", "CompileSettings",
           "__version__"]
