"""Kernel launches per incremental call, read from a plan's incremental GraphModule.

On a fast GPU an incremental call is bound by how many kernels it launches, not by its arithmetic
(a 1% edit of church-256 launches about a thousand small kernels). ``count_launches`` reads that
number from the graph, without a GPU, so fusion work can be measured on any machine.

The rule, node by node:

1. Only ``call_function`` nodes whose target is an ATen or ``sigec`` operator can launch:
   placeholders, ``get_attr``, ``output``, ``operator.getitem`` and symbolic-size arithmetic launch
   nothing.
2. The graph is run once on the ``meta`` device (every input an empty tensor of its recorded
   shape, stride and dtype; one active block per grid), each node under a ``TorchDispatchMode``
   that sees the operators reaching the dispatcher's backends, composite ones decomposed as they
   run on a GPU (``conv2d`` as ``convolution``; ``linear`` as ``t`` + ``addmm``, or as ``mm`` +
   ``add`` on a non-contiguous input). Such an operator launches when it writes an input in place
   (its schema marks the argument written: ``sigec.scatter_``, ``fill_``) or returns a tensor that
   is neither one of its inputs nor a view of one. So views (``permute``, ``slice``,
   ``unsqueeze``), a ``reshape`` that can be a view, ``to`` the dtype a tensor already has and
   ``_assert_tensor_metadata`` launch nothing, while a ``reshape`` that must copy and every
   computing op launch. Allocations without a fill (``empty``, ``new_empty``) launch nothing.
3. A launching operator counts the kernels its CUDA implementation launches where sigec wrote that
   implementation (``csrc/cuda_kernels.cu``): ``sigec.gather_cat`` one per concatenated source,
   ``sigec.scatter_gather_`` two (a scatter, then the gather that reads it); every other operator
   counts one.

So the count is a lower bound on what a GPU profiler shows: a library op may launch more than one
kernel (cuDNN's convolution with its bias, group norm's statistics and normalization, attention
through PyTorch's ``scaled_dot_product_attention`` with its layout copies), and a node that
receives zero active blocks launches nothing. ``benchmarks/gpu.py`` prints both numbers where a GPU
is lent.

``kind`` groups launches for reports: ``gather`` (ops reading blocks or tokens by index, including
``sigec.residual_add``), ``scatter`` (writing them back), ``conv``, ``matmul``, ``attention``,
``norm``, ``pointwise`` (operators tagged pointwise, and ``sigec.affine_act``) and ``other``
(concatenation, resampling, factories, copies).
"""
from __future__ import annotations

import dataclasses
import logging
import weakref
from collections import Counter
from typing import Any, Callable, Optional, Sequence

import torch
from torch.fx import GraphModule, Interpreter, Node
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

log = logging.getLogger("sigec.core.launches")


KINDS = ("gather", "scatter", "conv", "matmul", "attention", "norm", "pointwise", "other")

#: operators that allocate without writing: no kernel
_NO_KERNEL = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
              "aten::new_empty_strided", "aten::_assert_tensor_metadata", "aten::_assert_async",
              "aten::sym_constrain_range_for_size", "aten::_unsafe_view"}

#: operator name -> kind (names without the overload)
_KIND_BY_NAME = {
    **dict.fromkeys(["sigec::gather", "sigec::gather_cat", "sigec::token_gather", "sigec::residual_add",
                     "sigec::tile_blocks"], "gather"),
    **dict.fromkeys(["sigec::scatter_", "sigec::scatter_gather_", "sigec::token_scatter_"], "scatter"),
    **dict.fromkeys(["aten::conv2d", "aten::convolution", "aten::_convolution", "aten::conv_transpose2d",
                     "aten::cudnn_convolution", "sigec::conv_windows", "sigec::im2col"], "conv"),
    **dict.fromkeys(["aten::linear", "aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::baddbmm",
                     "aten::einsum", "sigec::linear"], "matmul"),
    **dict.fromkeys(["sigec::attention", "sigec::attention_blocks", "aten::scaled_dot_product_attention",
                     "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
                     "aten::softmax", "aten::_softmax"], "attention"),
    **dict.fromkeys(["aten::group_norm", "aten::native_group_norm", "aten::layer_norm", "aten::native_layer_norm",
                     "aten::batch_norm", "aten::_native_batch_norm_legit_no_training", "aten::instance_norm",
                     "sigec::norm_affine"], "norm"),
    "sigec::affine_act": "pointwise",
}


def _cuda_kernels(func: torch._ops.OpOverload, args: tuple) -> int:
    """Kernels sigec's CUDA implementation of a ``sigec`` op launches (one for any other op)."""
    name = _op_name(func)
    if name == "sigec::gather_cat":
        return max(len(args[0]), 1)
    if name == "sigec::scatter_gather_":
        return 2
    return 1


def _op_name(target: Any) -> str:
    schema = getattr(target, "_schema", None)
    return schema.name if schema is not None else ""


def op_kind(target: Any) -> str:
    """The report group of an operator (one of ``KINDS``)."""
    name = _op_name(target)
    kind = _KIND_BY_NAME.get(name)
    if kind is not None:
        return kind
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        return "pointwise"
    return "other"


@dataclasses.dataclass(frozen=True)
class LaunchCount:
    """Kernel launches of one call of an incremental graph (see the module docstring for the rule).

    Attributes:
        launches: CUDA kernels launched per call (a lower bound: see the module docstring).
        ops: launching operators dispatched per call, each counted once (``launching_ops``
            counts the same at run time).
        nodes: graph nodes that launch at least one kernel.
        by_kind: launches per kind (``KINDS`` order; kinds with none left out).
        by_node: node name -> launches, for every launching node.
    """

    launches: int
    ops: int
    nodes: int
    by_kind: dict
    by_node: dict

    def describe(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in self.by_kind.items())
        return f"{self.launches} launches from {self.nodes} nodes ({kinds})"


# -- counting dispatched operators -------------------------------------------------------------


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    return value


def _fresh_outputs(result: Any, inputs: list) -> bool:
    """Whether ``result`` holds a tensor that is neither one of ``inputs`` nor a view of one."""
    for out in pytree.tree_leaves(result):
        if isinstance(out, torch.Tensor) and not any(out is t or torch._C._is_alias_of(out, t) for t in inputs):
            return True
    return False


def _writes_input(func: torch._ops.OpOverload) -> bool:
    return any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)


class _LaunchCounter(TorchDispatchMode):
    """Counts the operators that reach the dispatcher's backends and launch kernels (rule 2 of the
    module docstring). Composite operators arrive decomposed, as they run on a GPU: ``conv2d`` as
    ``convolution``; ``linear`` as ``t`` + ``addmm``, or ``mm`` + ``add`` on a non-contiguous input.

    Attributes:
        ops: launching operators by name, each counted once.
        kernels: CUDA kernels they launch (rule 3).
    """

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if _op_name(func) not in _NO_KERNEL:
            inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            if _writes_input(func) or _fresh_outputs(result, inputs):
                self.ops[_op_name(func)] += 1
                self.kernels += _cuda_kernels(func, args)
        return result


class _MetaLauncher(Interpreter):
    """Runs a graph on meta tensors; ``launches`` maps each launching node to its kernels."""

    def __init__(self, gm: GraphModule, inputs: Sequence[Any]):
        super().__init__(gm, garbage_collect_values=True)
        self._inputs = iter(inputs)
        self.launches: dict[str, int] = {}
        self.ops = 0

    def placeholder(self, target, args, kwargs):
        return next(self._inputs)

    def get_attr(self, target, args, kwargs):
        return pytree.tree_map(_to_meta, super().get_attr(target, args, kwargs))

    def call_function(self, target, args, kwargs):
        if "device" in kwargs:  # factories (arange, ones) follow the graph onto the meta device
            kwargs = {**kwargs, "device": torch.device("meta")}
        counter = _LaunchCounter()
        with counter:
            result = super().call_function(target, args, kwargs)
        self.ops += sum(counter.ops.values())
        if counter.kernels:
            self.launches[self.current_node.name] = counter.kernels
        return result

    def run_node(self, n: Node) -> Any:
        self.current_node = n
        return super().run_node(n)


def _meta_inputs(plan) -> list:
    """Meta tensors for each input of ``plan.incremental``: the captured inputs and cached values
    from their recorded shapes, norm affines ``(N, C)`` float32, one active block per grid, and
    pixel masks ``(1, 1, H, W)``."""
    from sigec.core.codegen.incremental import NORM_SCALE, NORM_SHIFT  # no cycle at import

    gm = _graph_module(plan.incremental)
    sig = plan.signature
    dense = {n.name: n for n in plan.graph_module.graph.nodes}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    n_user = len(placeholders) - len(sig.caches) - len(sig.blocks) - len(sig.pixel_masks)
    values: list = []
    for ph in placeholders[:n_user]:
        values.append(_to_meta(ph.meta.get("val")))
    for ph, (name, kind) in zip(placeholders[n_user:], sig.caches):
        if kind in (NORM_SCALE, NORM_SHIFT):
            x = dense[name].args[0].meta["val"]
            values.append(torch.empty((x.shape[0], x.shape[1]), dtype=torch.float32, device="meta"))
        else:
            values.append(_to_meta(ph.meta.get("val", dense[name].meta.get("val"))))
    values += [torch.zeros((1, 2), dtype=torch.int64, device="meta") for _ in sig.blocks]
    values += [torch.zeros((1, 1, *mask.res), dtype=torch.bool, device="meta") for mask in sig.pixel_masks]
    return values


def _graph_module(incremental: torch.nn.Module) -> GraphModule:
    """The GraphModule of a plan's incremental runner (``sigec.core.cuda_graphs`` wraps it)."""
    return getattr(incremental, "graph_module", incremental)


_cache: "weakref.WeakKeyDictionary[GraphModule, LaunchCount]" = weakref.WeakKeyDictionary()


def count_launches(plan, inputs: Optional[Sequence[Any]] = None) -> LaunchCount:
    """Kernel launches of one call of ``plan``'s incremental graph (``sigec.core.engine.Plan``).

    ``inputs``: the arguments of one real call (only their shapes, strides and dtypes are read),
    for the exact count of that call; by default the graph's recorded shapes and one active block
    per grid, computed once per incremental GraphModule. Layouts matter in one place: ``linear``
    on a non-contiguous 3-D input is ``mm`` + ``add`` instead of one ``addmm``.
    """
    gm = _graph_module(plan.incremental)
    cached = _cache.get(gm) if inputs is None else None
    if cached is not None:
        return cached
    runner = _MetaLauncher(gm, _meta_inputs(plan) if inputs is None else [_to_meta(a) for a in inputs])
    with torch.no_grad():  # as the engine calls it (autograd changes how matmul folds)
        runner.run()
    result = _summarize(gm, runner.launches, runner.ops)
    if inputs is None:
        _cache[gm] = result
        log.debug("plan %.3g: %s", plan.planned_fraction, result.describe())
    return result


def _summarize(gm: GraphModule, launching: dict, ops: int) -> LaunchCount:
    kinds: Counter = Counter()
    for node in gm.graph.nodes:
        if node.name in launching:
            kinds[op_kind(node.target)] += launching[node.name]
    return LaunchCount(launches=sum(launching.values()), ops=ops, nodes=len(launching),
                       by_kind={k: kinds[k] for k in KINDS if kinds[k]}, by_node=dict(launching))


def launching_ops(fn: Callable[[], Any]) -> Counter:
    """Operators that ``fn()`` dispatches and that launch kernels, by name, each counted once: the
    count taken at run time (on any device) that ``count_launches`` reads from the graph."""
    counter = _LaunchCounter()
    with counter:
        fn()
    return counter.ops


__all__ = ["KINDS", "LaunchCount", "count_launches", "launching_ops", "op_kind"]
