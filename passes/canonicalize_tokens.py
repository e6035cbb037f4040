"""Rewrite token views of images as image views, and attention as one ``sigec.attention`` op.

Transformers flatten an image into tokens: ``(N, H, W, C) -> (N, H*W, C)`` (diffusers'
``Transformer2DModel``) or ``(N, C, H, W) -> (N, C, H*W)`` then a transpose (diffusers'
``Attention`` on 4-D input, hand-written DDPM blocks). Those 3-D values hide the pixel grid from
every later pass. This pass gives each such value its 4-D equivalent, the same memory reshaped:

* ``tokens`` ``(N, L, C)``  <->  ``(N, H, W, C)`` (channels last);
* ``channels`` ``(N, C, L)`` <->  ``(N, C, H, W)``.

Ops on them are rewritten onto the 4-D values when they mean the same there: pointwise ops,
``layer_norm`` and ``linear`` over channels, channel ``chunk``/``split``, group norm over
``(N, C, L)``, transposes between the two kinds, and the reshape back to an image (which
disappears). Attention, as ``scaled_dot_product_attention`` on split heads or as
``softmax(bmm(q, k) * s) @ v``, becomes ``sigec.attention(q, k, v, heads, scale)`` with the query
as an image (per-pixel for the later passes) and keys and values whole. Any other user of a
token value gets the 3-D value back by a reshape, so the rewrite never changes what the graph
computes; only what later passes can see. The rewritten nodes keep the originals' metadata
(``nn_module_stack``, ``stack_trace``) and get a fresh ``val``.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Callable, Optional

import torch
from torch._guards import detect_fake_mode
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from sigec.passes.op_table import arg, lookup, OpKind
from sigec.passes.pass_base import PassContext, finish_rewrite, sigec_pass

aten = torch.ops.aten
TOKENS, CHANNELS = "tokens", "channels"
_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
_TRANSPOSES = (aten.transpose.int, aten.permute.default)
_SOFTMAX = (aten._softmax.default, aten.softmax.int, aten._safe_softmax.default)
_SCALES = (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)
#: metadata copied from the node a rewritten node stands for
_KEPT_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node", "torch_fn")


@dataclasses.dataclass(frozen=True)
class _Image:
    """The 4-D equivalent of a 3-D value: ``node`` (4-D), which of the two kinds, and (H, W)."""
    node: Node
    kind: str
    hw: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class _Heads:
    """A token value split into heads, ``(N, L, heads, d)`` or, transposed, ``(N, heads, L, d)``."""
    tokens: Node  # the 3-D token value (an original node)
    heads: int
    transposed: bool


@dataclasses.dataclass(frozen=True)
class _Scores:
    """``bmm(q, k)`` of hand-written attention, times ``scale``; ``probs`` after the softmax."""
    query: _Image
    key: _Image
    scale: float
    probs: bool


def _val(node) -> Optional[torch.Tensor]:
    v = node.meta.get("val") if isinstance(node, Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _shape(node) -> Optional[tuple]:
    v = _val(node)
    return tuple(int(d) for d in v.shape) if v is not None else None


def _swaps_heads(node: Node) -> bool:
    """``transpose(x, 1, 2)`` of a 4-D value: ``(N, L, heads, d)`` <-> ``(N, heads, L, d)``."""
    return node.target == aten.transpose.int and {int(node.args[1]) % 4, int(node.args[2]) % 4} == {1, 2}


def _swaps_last_two(node: Node) -> bool:
    """``transpose(x, 1, 2)`` / ``permute(x, [0, 2, 1])`` of a 3-D value."""
    if node.target == aten.transpose.int:
        return {int(node.args[1]) % 3, int(node.args[2]) % 3} == {1, 2}
    return node.target == aten.permute.default and [int(d) % 3 for d in node.args[1]] == [0, 2, 1]


def _matmul_operands(node: Node) -> Optional[tuple[Node, Node, bool]]:
    """``(a, b, b_transposed)`` of a batched matrix product of 3-D values: ``bmm``/``matmul``, or an
    ``einsum`` such as ``"bic,bcj->bij"`` (``b`` as is) or ``"bic,bjc->bij"`` (``b`` transposed)."""
    if node.target in (aten.bmm.default, aten.matmul.default):
        a, b = node.args[:2]
        if len(_shape(a) or ()) == 3 and len(_shape(b) or ()) == 3:
            return a, b, False
        return None
    if node.target != aten.einsum.default or len(node.args[1]) != 2:
        return None
    equation = node.args[0].replace(" ", "")
    inputs, _, out = equation.partition("->")
    lhs = inputs.split(",")
    if len(lhs) != 2 or any(len(x) != 3 for x in (*lhs, out)) or not (lhs[0][0] == lhs[1][0] == out[0]):
        return None
    (batch, row, inner), other = lhs[0], lhs[1]
    if out[1] != row or len({batch, row, inner, out[2]}) != 4:
        return None
    if other == batch + inner + out[2]:
        return node.args[1][0], node.args[1][1], False
    if other == batch + out[2] + inner:
        return node.args[1][0], node.args[1][1], True
    return None


class _Rewriter:
    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.graph = gm.graph
        self.fake_mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"])
        self.images: dict[Node, _Image] = {}
        self.heads: dict[Node, _Heads] = {}
        self.scores: dict[Node, _Scores] = {}
        #: attention outputs in head form, waiting for the merge of heads: node -> (4-D output,
        #: whether the heads are already transposed back to ``(N, L, heads, d)``)
        self.merging: dict[Node, tuple[Node, bool]] = {}
        self.rewritten = 0

    # -- building nodes ----------------------------------------------------------------------
    def _make(self, origin: Node, target, args, kwargs=None) -> Node:
        with self.graph.inserting_before(origin):
            new = self.graph.call_function(target, tuple(args), dict(kwargs or {}))
        for key in _KEPT_META:
            if key in origin.meta:
                new.meta[key] = origin.meta[key]
        with self.fake_mode:
            new.meta["val"] = target(*map_arg(new.args, lambda n: n.meta["val"]),
                                     **map_arg(new.kwargs, lambda n: n.meta["val"]))
        return new

    def _flat(self, origin: Node, image: _Image, shape: tuple) -> Node:
        """The 3-D value back from its 4-D equivalent."""
        return self._make(origin, aten.reshape.default, (image.node, list(shape)))

    def _as_tokens_image(self, origin: Node, image: _Image) -> Node:
        """The ``(N, H, W, C)`` view of an image of either kind."""
        if image.kind == TOKENS:
            return image.node
        return self._make(origin, aten.permute.default, (image.node, [0, 2, 3, 1]))

    # -- recognising ---------------------------------------------------------------------------
    def _entry(self, node: Node) -> Optional[_Image]:
        """A reshape of a 4-D value into tokens or channels."""
        src, out = node.args[0], _shape(node)
        shape = _shape(src)
        if node.target not in _RESHAPES or shape is None or out is None or len(shape) != 4 or len(out) != 3:
            return None
        n, a, b, c = shape
        if a * b <= 1 or out[0] != n:
            return None
        if out == (n, a * b, c):
            return _Image(src, TOKENS, (a, b))
        if out == (n, a, b * c):
            return _Image(src, CHANNELS, (b, c))
        return None

    def _rewrite(self, node: Node) -> bool:
        """Rewrite one node whose operands include a recognised value; False when it cannot."""
        t = node.target
        product = _matmul_operands(node)
        if product is not None:
            return self._product(node, *product)
        first = node.args[0] if node.args and isinstance(node.args[0], Node) else None
        if first in self.images:
            image = self.images[first]
            if t in _RESHAPES:
                return self._reshape(node, image)
            if t in _TRANSPOSES and _swaps_last_two(node):
                order = [0, 3, 1, 2] if image.kind == TOKENS else [0, 2, 3, 1]
                other = CHANNELS if image.kind == TOKENS else TOKENS
                self.images[node] = _Image(self._make(node, aten.permute.default, (image.node, order)), other, image.hw)
                return True
        if first in self.heads:
            return self._heads_op(node, self.heads[first])
        if first in self.scores:
            return self._scores_op(node, self.scores[first])
        if first in self.merging:
            return self._merge(node)
        return self._elementwise(node)

    def _reshape(self, node: Node, image: _Image) -> bool:
        out = _shape(node)
        if out == _shape(image.node):  # back to the image: the rewrite's whole point
            node.replace_all_uses_with(image.node)
            return True
        n, length = out[0], _shape(node.args[0])[1]
        if image.kind == TOKENS and len(out) == 4 and out[1] == length and out[0] == n:
            self.heads[node] = _Heads(node.args[0], out[2], transposed=False)
            return True
        return False

    def _heads_op(self, node: Node, heads: _Heads) -> bool:
        if _swaps_heads(node):
            self.heads[node] = dataclasses.replace(heads, transposed=not heads.transposed)
            return True
        if node.target == aten.scaled_dot_product_attention.default and heads.transposed:
            return self._sdpa(node, heads)
        return False

    def _key_tokens(self, origin: Node, key: Node) -> Node:
        """A key or value operand of sdpa as ``(N, S, C)`` or an image ``(N, H, W, C)``."""
        if key in self.heads and self.heads[key].transposed:
            source = self.heads[key].tokens
            return self._as_tokens_image(origin, self.images[source]) if source in self.images else source
        split = key.args[0] if _swaps_heads(key) else None
        if split is not None and split.target in _RESHAPES and len(_shape(split.args[0]) or ()) == 3:
            return split.args[0]  # transpose(view(k3, [N, S, heads, d]), 1, 2): read k3
        n, h, s, d = _shape(key)
        merged = self._make(origin, aten.transpose.int, (key, 1, 2))
        return self._make(origin, aten.reshape.default, (merged, [n, s, h * d]))

    def _sdpa(self, node: Node, q: _Heads) -> bool:
        if any(arg(node, i, name, default) != default for i, name, default in
               ((3, "attn_mask", None), (4, "dropout_p", 0.0), (5, "is_causal", False))):
            return False
        if q.tokens not in self.images or arg(node, 7, "enable_gqa", False):
            return False
        query = self._as_tokens_image(node, self.images[q.tokens])
        key = self._key_tokens(node, node.args[1])
        value = self._key_tokens(node, node.args[2])
        out = self._make(node, torch.ops.sigec.attention.default,
                         (query, key, value, q.heads, arg(node, 6, "scale", None)))
        self.merging[node] = (out, False)
        return True

    def _merge(self, node: Node) -> bool:
        """transpose(attention, 1, 2) then reshape(.., [N, L, C]): the tokens of the output."""
        out, heads_last = self.merging[node.args[0]]
        if not heads_last and _swaps_heads(node):
            self.merging[node] = (out, True)
            return True
        shape = _shape(node)
        if heads_last and node.target in _RESHAPES and shape is not None and len(shape) == 3:
            self.images[node] = _Image(out, TOKENS, tuple(_shape(out)[1:3]))
            return True
        return False

    def _product(self, node: Node, a: Node, b: Node, b_transposed: bool) -> bool:
        """``q @ k`` (scores: the keys' channels meet the queries') or ``softmax(scores) @ v``."""
        if b not in self.images:
            return False
        other = self.images[b]
        if a in self.images and self.images[a].kind == TOKENS:
            if other.kind != (TOKENS if b_transposed else CHANNELS):
                return False
            self.scores[node] = _Scores(self.images[a], other, 1.0, probs=False)
            return True
        scores = self.scores.get(a)
        if scores is None or not scores.probs or other.kind != (CHANNELS if b_transposed else TOKENS):
            return False
        query = self._as_tokens_image(node, scores.query)
        key = self._as_tokens_image(node, scores.key)
        value = self._as_tokens_image(node, other)
        out = self._make(node, torch.ops.sigec.attention.default, (query, key, value, 1, scores.scale))
        self.images[node] = _Image(out, TOKENS, scores.query.hw)
        return True

    def _scores_op(self, node: Node, scores: _Scores) -> bool:
        t = node.target
        if not scores.probs and t in _SCALES and isinstance(node.args[1], (int, float)):
            factor = float(node.args[1]) if t in (aten.mul.Tensor, aten.mul.Scalar) else 1.0 / float(node.args[1])
            self.scores[node] = dataclasses.replace(scores, scale=scores.scale * factor)
            return True
        if not scores.probs and t in _SOFTMAX and int(node.args[1]) % 3 == 2:
            self.scores[node] = dataclasses.replace(scores, probs=True)
            return True
        return False

    def _elementwise(self, node: Node) -> bool:
        """Ops that mean the same on the 4-D equivalent (per token, or per channel over all tokens)."""
        operands = [a for a in node.all_input_nodes if a in self.images]
        kinds = {self.images[a].kind for a in operands}
        hws = {self.images[a].hw for a in operands}
        if len(kinds) != 1 or len(hws) != 1:
            return False
        kind, hw = kinds.pop(), hws.pop()
        channel_dim = 3 if kind == TOKENS else 1
        t = node.target
        if t == aten._assert_tensor_metadata.default:
            self.graph.erase_node(node)
            return True
        if t == operator.getitem:
            return False  # handled with the multi-output op below
        if t == aten.layer_norm.default or t == aten.linear.default:
            if kind != TOKENS or node.args[0] not in self.images:
                return False
            if t == aten.layer_norm.default and len(node.args[1]) != 1:
                return False
            return self._replace(node, kind, hw, broadcast=False)
        if t == aten.group_norm.default:
            return kind == CHANNELS and self._replace(node, kind, hw, broadcast=False)
        if t in (aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default):
            if int(arg(node, 2, "dim", 0)) % 3 != (2 if kind == TOKENS else 1):
                return False
            new = self._make(node, t, (self.images[node.args[0]].node, node.args[1], channel_dim))
            for user in list(node.users):
                if user.target != operator.getitem:
                    return False
            for user in list(node.users):
                part = self._make(user, operator.getitem, (new, user.args[1]))
                self.images[user] = _Image(part, kind, hw)
            self.rewritten += 1
            return True
        if t in (aten.contiguous.default, aten.clone.default):
            return self._replace(node, kind, hw, keep_args=1)
        rule = lookup(t)
        if rule is None or rule.kind is not OpKind.POINTWISE:
            return False
        return self._replace(node, kind, hw)

    def _replace(self, node: Node, kind: str, hw: tuple[int, int], keep_args: Optional[int] = None,
                 broadcast: bool = True) -> bool:
        """The same op on the 4-D equivalents. Other tensor operands of a pointwise op
        (``broadcast``) are reshaped to broadcast alike; those of other ops (weights) are kept."""
        shape = _shape(node)
        if shape is None or len(shape) != 3:
            return False
        length = shape[1] if kind == TOKENS else shape[2]
        failed = []

        def lift(a):
            """Another operand of ``shape``'s op, reshaped to broadcast over the 4-D value alike."""
            if not isinstance(a, Node):
                return a
            if a in self.images:
                return self.images[a].node
            if not broadcast:
                return a
            other = _shape(a)
            if other is None or len(other) == 0:
                return a
            if len(other) == 1:  # broadcasts over the last dimension: channels, or tokens
                if kind == CHANNELS and other[0] == length > 1:
                    return self._make(node, aten.reshape.default, (a, list(hw)))
                return a
            positions = other[-2] if kind == TOKENS else other[-1]
            if positions == length and length > 1:  # (..., L, C) -> (..., H, W, C); (..., C, L) -> (..., C, H, W)
                new_shape = [*other[:-2], *hw, other[-1]] if kind == TOKENS else [*other[:-1], *hw]
                return self._make(node, aten.reshape.default, (a, new_shape))
            if positions == 1:  # (.., 1, C) -> (.., 1, 1, C); (.., C, 1) -> (.., C, 1, 1)
                if kind == TOKENS:
                    return self._make(node, aten.unsqueeze.default, (a, -2)) if len(other) >= 3 else a
                return self._make(node, aten.unsqueeze.default, (a, -1))
            failed.append(a)
            return a

        args = node.args if keep_args is None else node.args[:keep_args]
        new_args = map_arg(args, lift)
        new_kwargs = map_arg(node.kwargs, lift) if keep_args is None else {}
        if failed:
            return False
        new = self._make(node, node.target, new_args, new_kwargs)
        self.images[node] = _Image(new, kind, hw)
        self.rewritten += 1
        return True

    # -- driving -------------------------------------------------------------------------------
    def _restore_operands(self, node: Node) -> None:
        """A node the rewrite does not cover reads the 3-D values back."""
        def restore(a):
            if a in self.images and _shape(a) is not None and _shape(a) != _shape(self.images[a].node):
                return self._flat(node, self.images[a], _shape(a))
            return a
        node.args = map_arg(node.args, restore)
        node.kwargs = map_arg(node.kwargs, restore)

    def run(self) -> int:
        for node in list(self.graph.nodes):
            if node.op == "output":
                self._restore_operands(node)
                continue
            if node.op != "call_function":
                continue
            pending = [a for a in node.all_input_nodes
                       if a in self.images or a in self.heads or a in self.scores or a in self.merging]
            if not pending:
                entry = self._entry(node)
                if entry is not None:
                    self.images[node] = entry
            elif not self._rewrite(node):
                self._restore_operands(node)
        # the originals now unused; eliminate_dead_code alone would keep those it deems impure (dropout)
        replaced = set(self.images) | set(self.heads) | set(self.scores) | set(self.merging)
        for node in reversed(list(self.graph.nodes)):
            if node.op == "call_function" and not node.users and (node in replaced or not node.is_impure()):
                self.graph.erase_node(node)
        return self.rewritten + sum(1 for n in self.graph.nodes if n.target == torch.ops.sigec.attention.default)


@sigec_pass()
def canonicalize_tokens(gm: GraphModule, ctx: PassContext) -> GraphModule:
    rewriter = _Rewriter(gm)
    if rewriter.fake_mode is None:
        return gm  # no example values to re-derive shapes from: leave the graph as captured
    return finish_rewrite(gm, rewriter.run(), "token values rewritten as images")
