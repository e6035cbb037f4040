"""The compiler core every mode builds on: capture, input checks, code generation, the spatial
``Engine`` and its report, and the incremental runners (CUDA graphs, inductor)."""
