"""Emit the incremental GraphModule.

Its inputs are ``(*flat user inputs, *cached tensors, *block indices, *pixel masks)`` and its
outputs ``(*flat model outputs, *updated cached values)``; ``IncrementalSignature`` names each
position. Each value of the analysed graph is represented in one of three forms:

* ``full``   - a full tensor, correct everywhere (recorded values outside the active region);
* ``blocks`` - only the active blocks of a (mask, grid), stacked along the batch dimension;
* ``plain``  - a value that does not depend on the edit, or a fallback's dense value.

Conversions are memoized, so a value is scattered at most once and gathered at most once per
(mask, grid): ``full_of`` scatters blocks into the recorded tensor, ``blocks_of`` gathers.

A gather that reads a skip connection's ``cat`` reads its parts instead (``gather_cat``), so
the concatenation is never scattered nor cached. Scatters write **in place** into the cached tensor (``sigec.scatter_``), which serves as the
persistent working buffer of its site: the cost is proportional to the active area. The graph
therefore mutates those cache inputs; ``IncrementalSignature.inplace`` lists them with the blocks
written, so the engine can save the overwritten blocks before a run and restore them before the
next one. A cache stored in another dtype than the model computes in (``cache_dtype``, listed in
``IncrementalSignature.stored``) is a working buffer too: the scatter rounds the blocks into it,
gathers read it and widen their windows (proportional to the active area again), and only a
consumer of the whole tensor (an output, a dense op) reads a widened copy.
Sparse ops consume blocks; dense ops and fallbacks consume full tensors; a fallback region's
image outputs are taken inside their mask (``where(mask, new, recorded)``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import operator
from typing import Optional

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg

from sigec.ir import meta_keys as K
from sigec.passes.op_table import OpKind, norm_args
from sigec.ir.plan import NCHW, NHWC, DecisionKind, is_image, needs_select
from sigec.runtime import masks as M
from sigec.runtime import ops as sigec_runtime_ops

aten = torch.ops.aten
sigec_ops = torch.ops.sigec

#: dense convolutions whose input layout codegen adapts to the weight (``dense_conv_input``)
DENSE_CONVOLUTIONS = (aten.conv2d.default, aten.convolution.default)

#: cache entry kinds: a recorded value, or the frozen affine of a NORM node.
VALUE, NORM_SCALE, NORM_SHIFT = "value", "norm_scale", "norm_shift"


@dataclasses.dataclass
class IncrementalSignature:
    """Positions of the incremental graph's inputs and outputs.

    Attributes:
        (The flat user inputs come first, in the captured graph's order.)
        caches: ``(node name, kind)`` of each cached tensor input, in order.
        blocks: ``(mask, block)`` of each block-index input, in order.
        pixel_masks: mask expressions passed as ``(1, 1, H, W)`` boolean inputs, in order.
        num_outputs: flat model outputs first in the results.
        updated: ``(node name)`` of each updated cached value returned after the outputs.
        inplace: ``(cache position, block-index position, channels-last)`` of each cached tensor
            the graph overwrites in place, the blocks it writes, and whether the value is NHWC
            (its blocks are then written through an NCHW view).
        stored: ``(node name, kind)`` of each cache the graph expects in ``cache_dtype`` rather
            than in its value's own dtype (the engine stores those caches so).
    """

    caches: list = dataclasses.field(default_factory=list)
    blocks: list = dataclasses.field(default_factory=list)
    pixel_masks: list = dataclasses.field(default_factory=list)
    num_outputs: int = 0
    updated: list = dataclasses.field(default_factory=list)
    inplace: list = dataclasses.field(default_factory=list)
    stored: list = dataclasses.field(default_factory=list)

    def mask_exprs(self) -> list:
        return list(dict.fromkeys([m for m, _ in self.blocks] + list(self.pixel_masks)))


@dataclasses.dataclass(frozen=True)
class _Rep:
    node: Node
    form: str  # "full" | "blocks" | "plain"
    mask: Optional[M.MaskExpr] = None
    block: Optional[tuple[int, int]] = None


class _Emitter:
    def __init__(self, gm: GraphModule, batch: int, cache_dtype: Optional[torch.dtype]):
        self.batch = batch
        self.cache_dtype = cache_dtype
        self.by_name = {n.name: n for n in gm.graph.nodes}
        self.slot_constants = slot_constants(gm)
        self.g = Graph()
        self.reps: dict[Node, _Rep] = {}
        self.sig = IncrementalSignature()
        self._cache_ph: dict = {}
        self._block_ph: dict = {}
        self._mask_ph: dict = {}
        self._widened: dict = {}
        self._stored_full: dict = {}
        # stored full values (cache inputs) that are narrower or wider than their value: the dtype
        # their gathers widen to
        self._compute_dtype: dict[Node, torch.dtype] = {}
        self._blocks: dict = {}
        self._last_ph: Optional[Node] = None

    # -- inputs -----------------------------------------------------------------------------
    def _placeholder(self, name: str, like: Optional[Node] = None) -> Node:
        with self.g.inserting_after(self._last_ph) if self._last_ph is not None else contextlib.nullcontext():
            ph = self.g.placeholder(name)
        if like is not None and "val" in like.meta:
            ph.meta["val"] = like.meta["val"]
        self._last_ph = ph
        return ph

    def cache(self, node: Node, kind: str = VALUE) -> Node:
        key = (node.name, kind)
        if key not in self._cache_ph:
            self.sig.caches.append(key)
            prefix = {VALUE: "cache", NORM_SCALE: "scale", NORM_SHIFT: "shift"}[kind]
            ph = self._placeholder(f"{prefix}_{node.name}", node if kind == VALUE else None)
            self._cache_ph[key] = ph
            dtype = self._stored_dtype(node) if kind == VALUE else None
            if dtype is not None:
                self.sig.stored.append(key)
                self._compute_dtype[ph] = node.meta["val"].dtype
        return self._cache_ph[key]

    def _stored_dtype(self, node: Node) -> Optional[torch.dtype]:
        """``cache_dtype`` where the cache of ``node``'s value is stored in it and that differs
        from the value's dtype (edited floating values only: slot constants are small and kept
        as they are)."""
        val = node.meta.get("val")
        if (self.cache_dtype is None or not node.meta[K.SPATIAL].tainted or not isinstance(val, torch.Tensor)
                or not val.is_floating_point() or val.dtype == self.cache_dtype):
            return None
        return self.cache_dtype

    def indices(self, mask: M.MaskExpr, block) -> Node:
        key = (mask, tuple(block))
        if key not in self._block_ph:
            self.sig.blocks.append(key)
            self._block_ph[key] = self._placeholder(f"blocks_{len(self.sig.blocks) - 1}")
        return self._block_ph[key]

    def pixel_mask(self, mask: M.MaskExpr) -> Node:
        if mask not in self._mask_ph:
            self.sig.pixel_masks.append(mask)
            self._mask_ph[mask] = self._placeholder(f"mask_{len(self.sig.pixel_masks) - 1}")
        return self._mask_ph[mask]

    def order_placeholders(self, gm: GraphModule) -> None:
        """Put the inputs in the signature's order, whatever order they were requested in."""
        ordered = ([self.reps[n].node for n in gm.graph.nodes if n.op == "placeholder"]
                   + [self._cache_ph[k] for k in self.sig.caches]
                   + [self._block_ph[k] for k in self.sig.blocks]
                   + [self._mask_ph[m] for m in self.sig.pixel_masks])
        for ph in reversed(ordered):
            next(iter(self.g.nodes)).prepend(ph)

    # -- conversions ------------------------------------------------------------------------
    def call(self, target, args, kwargs=None, origin: Optional[Node] = None) -> Node:
        node = self.g.call_function(target, tuple(args), kwargs or {})
        if origin is not None:
            node.meta[K.ORIGIN] = origin.name
        return node

    def new(self, a):
        """Map an old-graph argument to its plain new-graph value (full for images)."""
        return map_arg(a, lambda n: self.full_of(n) if n in self.reps else n)

    def _permute(self, value: Node, to_layout: str, origin: Node) -> Node:
        dims = [0, 2, 3, 1] if to_layout == NHWC else [0, 3, 1, 2]
        return self.call(aten.permute.default, (value, dims), origin=origin)

    def full_of(self, node: Node) -> Node:
        """The full value of ``node`` in its own dtype."""
        stored = self.stored_full_of(node)
        dtype = self._compute_dtype.get(stored)
        if dtype is None:
            return stored
        if node not in self._widened:  # a widened copy (it keeps the cache's memory format)
            self._widened[node] = self.call(aten._to_copy.default, (stored,), {"dtype": dtype}, origin=node)
        return self._widened[node]

    def stored_full_of(self, node: Node) -> Node:
        """The full value of ``node`` as stored: the cached tensor its blocks were scattered
        into, which may be in ``cache_dtype`` (gathers read it so and widen their windows)."""
        rep = self.reps[node]
        if rep.form != "blocks":
            return rep.node
        if node not in self._stored_full:
            # the sigec ops work in NCHW; channels-last values are permuted around them
            nhwc = node.meta[K.SPATIAL].layout == NHWC
            cached = self.cache(node)
            blocks, base = rep.node, cached
            if nhwc:
                blocks, base = self._permute(blocks, NCHW, node), self._permute(base, NCHW, node)
            indices = self.indices(rep.mask, rep.block)
            self.call(sigec_ops.scatter_.default, (base, blocks, indices, list(rep.block)), origin=node)
            self.sig.inplace.append((self.sig.caches.index((node.name, VALUE)),
                                     self.sig.blocks.index((rep.mask, tuple(rep.block))), nhwc))
            self._stored_full[node] = cached  # read after the write: the graph runs in order
        return self._stored_full[node]

    def gather(self, full: "Node | list[Node]", mask, block, spec=None, prologue=(None, None, "none", 0.0),
               origin=None) -> Node:
        """Windows of a full tensor at the blocks of (mask, block); a list of full tensors is read
        as their channel concatenation (``gather_cat``), which is never materialized."""
        block = tuple(block)
        window, stride, offset = (spec.window, spec.stride, spec.offset) if spec else (block, block, (0, 0))
        pad_mode, pad_value = (spec.pad_mode, spec.pad_value) if spec else ("constant", 0.0)
        scale, shift, act, slope = prologue
        target = sigec_ops.gather_cat.default if isinstance(full, list) else sigec_ops.gather.default
        windows = self.call(target,
                            (full, self.indices(mask, block), list(window), list(stride), list(offset),
                             pad_mode, float(pad_value), scale, shift, act, float(slope)), origin=origin)
        dtype = self._compute_dtype.get(full[0] if isinstance(full, list) else full)
        if dtype is not None:  # the windows of a cache stored in another dtype, in the value's
            windows = self.call(aten._to_copy.default, (windows,), {"dtype": dtype}, origin=origin)
        return windows

    def cat_parts(self, node: Node) -> Optional[list[Node]]:
        """The full values of the parts of a channel ``cat`` that a gather can read in place of
        the ``cat``'s own full value, so the concatenation is never scattered.

        Only when that changes nothing: the ``cat`` is in blocks and not yet materialized, and
        each part is either independent of the edit or in blocks of the same mask and grid (so
        it differs from its recording exactly where the ``cat`` does).
        """
        if node.op != "call_function" or node.target != aten.cat.default or node in self._stored_full:
            return None
        rep = self.reps[node]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if rep.form != "blocks" or dim not in (1, -3) or node.meta[K.SPATIAL].layout == NHWC:
            return None
        size = tuple(node.meta["val"].shape[-2:])
        for part in node.args[0]:
            part_rep = self.reps.get(part)
            same_blocks = part_rep is not None and part_rep.form == "blocks" and \
                (part_rep.mask, part_rep.block) == (rep.mask, rep.block)
            untouched = part_rep is not None and part_rep.form == "plain" and \
                tuple(part.meta["val"].shape[-2:]) == size
            if not (same_blocks or untouched):
                return None
        # gather_cat reads sources of one dtype: stored values if they share theirs
        stored = [self.stored_full_of(part) for part in node.args[0]]
        if len({self._compute_dtype.get(s) for s in stored}) == 1:
            return stored
        return [self.full_of(part) for part in node.args[0]]

    def blocks_of(self, node: Node, mask, block) -> Node:
        rep = self.reps[node]
        if rep.form == "blocks" and rep.mask == mask and rep.block == tuple(block):
            return rep.node
        key = (node, mask, tuple(block))
        if key not in self._blocks:
            stored = self.stored_full_of(node)
            if node.meta[K.SPATIAL].layout == NHWC:
                full = self._permute(stored, NCHW, node)
                if stored in self._compute_dtype:
                    self._compute_dtype[full] = self._compute_dtype[stored]
                self._blocks[key] = self._permute(self.gather(full, mask, block, origin=node), NHWC, node)
            else:
                self._blocks[key] = self.gather(stored, mask, block, origin=node)
        return self._blocks[key]

    def norm_params(self, norm: Node) -> tuple[Node, Node]:
        return self.cache(norm, NORM_SCALE), self.cache(norm, NORM_SHIFT)

    # -- node emission ----------------------------------------------------------------------
    def emit(self, node: Node) -> None:
        if node.op == "placeholder":
            ph = self._placeholder(node.name, node)
            self.reps[node] = _Rep(ph, "full" if is_image(node) else "plain")
            return
        if node.op == "get_attr":
            new = self.g.get_attr(node.target)
            new.meta.update(node.meta)
            self.reps[node] = _Rep(new, "plain")
            return
        if node.op == "output":
            self._emit_output(node)
            return
        if node.op != "call_function":
            return  # call_module guards were stripped at capture; anything else has no users
        rule = node.meta.get(K.RULE)
        if rule is not None and rule.kind is OpKind.IGNORED:
            return
        decision = node.meta[K.DECISION].kind
        if decision is DecisionKind.STATIC and node in self.slot_constants:
            self.reps[node] = _Rep(self.cache(node), "plain")
        elif decision is DecisionKind.STATIC:
            new = self.call(node.target, self.new(node.args), self.new(node.kwargs), node)
            new.meta["val"] = node.meta.get("val")
            self.reps[node] = _Rep(new, "plain")
        elif decision is DecisionKind.FALLBACK:
            self._emit_fallback(node)
        elif decision is DecisionKind.DENSE:
            self._emit_dense(node, rule)
        else:
            self._emit_sparse(node, rule)

    def _emit_fallback(self, node: Node) -> None:
        new = self.call(node.target, self.new(node.args), self.new(node.kwargs), node)
        if needs_select(node):
            mask = self.pixel_mask(node.meta[K.MASK])
            if node.meta[K.SPATIAL].layout == NHWC:
                mask = self._permute(mask, NHWC, node)
            new = self.call(aten.where.self, (mask, new, self.cache(node)), origin=node)
            # the cache may be stored in another dtype; the value keeps the model's
            new = self.call(aten.to.dtype, (new, node.meta["val"].dtype), origin=node)
        self.reps[node] = _Rep(new, "full" if is_image(node) else "plain")

    def _emit_dense(self, node: Node, rule) -> None:
        if rule.kind is OpKind.NORM:
            scale, shift = self.norm_params(node)
            new = self.call(sigec_ops.affine_act.default,
                            (self.full_of(norm_args(node)[0]), scale, shift, "none", 0.0), origin=node)
        elif rule.kind is OpKind.PROJECTION:
            new = self.call(operator.getitem, (self.reps[node.args[0]].node, node.args[1]), origin=node)
        elif node.target in DENSE_CONVOLUTIONS and len(node.args) >= 2:
            # a channels-last input would make the convolution copy its weight on every call
            x, weight, *rest = self.new(node.args)
            x = self.call(sigec_runtime_ops.dense_conv_input, (x, weight), origin=node)
            new = self.call(node.target, (x, weight, *rest), self.new(node.kwargs), node)
        else:
            new = self.call(node.target, self.new(node.args), self.new(node.kwargs), node)
        self.reps[node] = _Rep(new, "full")

    def _emit_sparse(self, node: Node, rule) -> None:
        mask, block = node.meta[K.MASK], node.meta[K.GRID]
        if rule.kind is OpKind.PROJECTION:
            src = self.reps[node.args[0]]
            new = self.call(operator.getitem, (src.node, node.args[1]), origin=node)
            self.reps[node] = dataclasses.replace(src, node=new)
            return
        if rule.kind is OpKind.LOCAL:
            new = self._emit_local(node, rule, mask, block)
        elif rule.kind is OpKind.ATTENTION:
            # queries of the active blocks against whole keys and values (written in place first)
            query = self.blocks_of(node.args[0], mask, block)
            new = self.call(sigec_ops.attention_blocks.default, (query, *self.new(tuple(node.args[1:]))), origin=node)
        elif rule.kind is OpKind.NORM:
            scale, shift = self.norm_params(node)
            x = self.blocks_of(norm_args(node)[0], mask, block)
            new = self.call(sigec_ops.affine_act.default, (x, scale, shift, "none", 0.0), origin=node)
        else:
            new = self._emit_blockwise(node, mask, block)
        self.reps[node] = _Rep(new, "blocks", mask, tuple(block))

    def _emit_local(self, node: Node, rule, mask, block) -> Node:
        spec = node.meta[K.WINDOW]
        pro = node.meta.get(K.PROLOGUE)
        source = pro.source if pro is not None else node.args[0]
        full = self.cat_parts(source) or self.stored_full_of(source)
        if pro is not None:
            scale, shift = self.norm_params(pro.norm) if pro.norm is not None else (None, None)
            windows = self.gather(full, mask, block, spec, (scale, shift, pro.activation, pro.slope), origin=node)
        else:
            windows = self.gather(full, mask, block, spec, origin=node)
        target, args, kwargs = rule.local.block_call(node, windows, spec)
        out = windows
        if target is not None:
            args = map_arg(args, lambda a: a if a is windows else self.new(a))
            out = self.call(target, args, self.new(kwargs), node)
        if spec.crop != (0, 0):
            (ct, cl), (bh, bw) = spec.crop, spec.block
            out = self.call(aten.slice.Tensor, (out, 2, ct, ct + bh), origin=node)
            out = self.call(aten.slice.Tensor, (out, 3, cl, cl + bw), origin=node)
        return out

    def _emit_blockwise(self, node: Node, mask, block) -> Node:
        res = node.meta[K.SPATIAL].resolution
        images = [a for a in node.all_input_nodes if is_image(a)]
        ref = self.blocks_of(images[0], mask, block)

        def convert(a: Node) -> Node:
            if is_image(a):
                return self.blocks_of(a, mask, block)
            rep = self.reps[a]
            v = a.meta.get("val")
            if isinstance(v, torch.Tensor) and v.dim() == 4:
                if tuple(v.shape[-2:]) == tuple(res):
                    key = (a, mask, tuple(block))
                    if key not in self._blocks:
                        self._blocks[key] = self.gather(rep.node, mask, block, origin=a)
                    return self._blocks[key]
                if v.shape[0] == self.batch and self.batch > 1:
                    return self.call(sigec_ops.tile_blocks.default, (rep.node, ref), origin=a)
            return rep.node

        return self.call(node.target, map_arg(node.args, convert), map_arg(node.kwargs, convert), node)

    def _emit_output(self, node: Node) -> None:
        outs = map_arg(node.args[0], lambda n: self.full_of(n) if is_image(n) else self.reps[n].node)
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        self.sig.num_outputs = len(outs)
        updated: list[Node] = []
        done = 0
        while done < len(self.sig.caches):  # full_of may request the cache it scatters into
            name, kind = self.sig.caches[done]
            done += 1
            if kind == VALUE and self.by_name[name].meta[K.SPATIAL].tainted:
                full = self.stored_full_of(self.by_name[name])
                if full is not self._cache_ph[(name, kind)]:  # not written in place
                    self.sig.updated.append(name)
                    updated.append(full)
        self.g.output(tuple(outs + updated))


def slot_constants(gm: GraphModule) -> set:
    """Static tensors computed from the non-spatial inputs (timestep embeddings, ...) where they
    meet the image path. A slot is keyed by those inputs' values, so these are constant within
    a slot: the incremental graph reads them from the cache instead of recomputing them."""
    from_inputs: set = set()
    out = set()
    for node in gm.graph.nodes:
        if node.meta[K.SPATIAL].tainted or node.op not in ("placeholder", "call_function"):
            continue
        if node.op == "placeholder" or any(a in from_inputs for a in node.all_input_nodes):
            from_inputs.add(node)
            if isinstance(node.meta.get("val"), torch.Tensor) and node.op != "placeholder" and any(
                    u.op != "output" and u.meta[K.SPATIAL].tainted for u in node.users):
                out.add(node)
    return out


def emit_incremental(gm: GraphModule, batch: int,
                     cache_dtype: Optional[torch.dtype] = None) -> tuple[GraphModule, IncrementalSignature]:
    """The incremental GraphModule of an analysed graph (all analysis passes must have run).

    ``cache_dtype``: the dtype the edited values' caches are stored in (``None``: their own);
    ``IncrementalSignature.stored`` lists the caches it changes.
    """
    em = _Emitter(gm, batch, cache_dtype)
    for node in gm.graph.nodes:
        em.emit(node)
    em.order_placeholders(gm)
    em.g.eliminate_dead_code()
    em.g.lint()
    out = GraphModule(gm, em.g, class_name="SigecIncremental")
    return out, em.sig
