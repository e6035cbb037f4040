import pytest
import torch

from sigec.core.capture import capture, copy_graph_module
from sigec.passes import PassContext, canonicalize_tokens
from sigec.ir.settings import CompileSettings
from tests.attention_nets import HandWrittenAttention, HandWrittenNet, PooledTokens, TransformerNet
from tests.passes.helpers import nodes_by_target

aten = torch.ops.aten
attention = torch.ops.sigec.attention.default


def _rewritten(model, args):
    captured = capture(model.eval(), args)
    gm = canonicalize_tokens(copy_graph_module(captured.gm), PassContext(CompileSettings()))
    return captured.gm, gm


@pytest.mark.parametrize("batch", [1, 2])
def test_transformer_block_becomes_image_ops_and_attention(batch):
    torch.manual_seed(0)
    args = (torch.randn(batch, 3, 8, 12), torch.randn(batch, 5, 8))
    before, after = _rewritten(TransformerNet(), args)
    assert len(nodes_by_target(before, aten.scaled_dot_product_attention.default)) == 2
    calls = nodes_by_target(after, attention)
    assert len(calls) == 2 and not nodes_by_target(after, aten.scaled_dot_product_attention.default)
    # the query is the image itself (N, H, W, C); every token value became 4-D
    assert all(tuple(c.args[0].meta["val"].shape) == (batch, 8, 12, 16) for c in calls)
    assert all(n.meta["val"].dim() != 3 for n in after.graph.nodes
               if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)
               and "context" not in str(n.args))
    # self-attention reads image keys; cross-attention reads the context's projections
    assert calls[0].args[1].meta["val"].dim() == 4 and calls[1].args[1].meta["val"].shape[1] == 5
    assert calls[0].args[3] == 2  # heads
    torch.testing.assert_close(after(*args), before(*args), rtol=1e-5, atol=1e-5)


def test_rewritten_nodes_keep_their_module_paths():
    _, after = _rewritten(TransformerNet(), (torch.randn(1, 3, 8, 8), torch.randn(1, 5, 8)))
    paths = [list(n.meta["nn_module_stack"])[-1] for n in nodes_by_target(after, aten.layer_norm.default)]
    assert len(paths) == 3 and all("block.norm" in p for p in paths)


@pytest.mark.parametrize("form", HandWrittenAttention.FORMS)
def test_hand_written_softmax_attention_is_recognised(form):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    before, after = _rewritten(HandWrittenNet(form=form), (x,))
    (call,) = nodes_by_target(after, attention)
    assert call.args[3] == 1 and call.args[4] == pytest.approx(16 ** -0.5)
    assert not any(nodes_by_target(after, op) for op in (aten.bmm.default, aten.matmul.default, aten.einsum.default))
    torch.testing.assert_close(after(x), before(x), rtol=1e-5, atol=1e-5)


def test_tokens_meeting_an_unknown_op_get_their_3d_value_back():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 6, 6)
    before, after = _rewritten(PooledTokens(), (x,))
    assert len(nodes_by_target(after, attention)) == 1
    (mean,) = nodes_by_target(after, aten.mean.dim)
    assert mean.args[0].meta["val"].dim() == 3  # reshaped back from the 4-D image
    torch.testing.assert_close(after(x), before(x), rtol=1e-5, atol=1e-5)


def test_graph_without_tokens_is_unchanged():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()).eval()
    before, after = _rewritten(model, (torch.randn(1, 3, 8, 8),))
    assert [n.target for n in after.graph.nodes] == [n.target for n in before.graph.nodes]
