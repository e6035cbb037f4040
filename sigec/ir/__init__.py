"""What the passes, the runtime and the core share: the keys of ``node.meta``, the analysis
results' types, the compile settings, and the cost model (MAC counts, measured kernel costs).
Nothing here imports from the rest of sigec except the runtime's kernels."""
