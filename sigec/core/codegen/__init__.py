"""Code generation: the recording and incremental GraphModules from one analysed graph."""
from sigec.core.codegen.incremental import IncrementalSignature, emit_incremental
from sigec.core.codegen.recording import emit_recording

__all__ = ["IncrementalSignature", "emit_incremental", "emit_recording"]
