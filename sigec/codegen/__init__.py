"""Code generation: the recording and incremental GraphModules from one analysed graph."""
from sigec.codegen.incremental import IncrementalSignature, emit_incremental
from sigec.codegen.recording import emit_recording

__all__ = ["IncrementalSignature", "emit_incremental", "emit_recording"]
