"""Context parallelism's attention on one rank (a 1-rank gloo group): the head-tail chunks, each cut at the
documents inside it, attend exactly as the plain model does, with and without the CPU blockwise merge."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from spindle.config import ModelConfig
from spindle.model.llama import build_model
from spindle.parallel import blockwise
from spindle.parallel.blockwise import past_and_own
from spindle.parallel.context import ContextParallel, _pieces


def test_pieces_cut_a_chunk_at_document_starts():
    starts = [0, 5, 9, 30]
    assert list(_pieces(starts, 0, 8)) == [(0, 0, 5), (5, 5, 8)]
    assert list(_pieces(starts, 8, 8)) == [(5, 8, 9), (9, 9, 16)]  # the first piece continues a document
    assert list(_pieces(starts, 16, 16)) == [(9, 16, 30), (30, 30, 32)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_past_and_own_is_lower_right_causal_attention(dtype, tol):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 37, 16, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 4, 87, 16, dtype=dtype, requires_grad=True) for _ in range(2))
    g = torch.randn(2, 4, 37, 16, dtype=dtype)
    past_and_own(q, k[:, :, :50], v[:, :, :50], k[:, :, 50:], v[:, :, 50:]).backward(g)
    got = [t.grad.float() for t in (q, k, v)]
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    mask = torch.ones(37, 87, dtype=torch.bool).tril(50)  # query i sees keys up to 50 + i
    F.scaled_dot_product_attention(*ref_in, attn_mask=mask).backward(g.float())
    for a, r in zip(got, ref_in):
        torch.testing.assert_close(a, r.grad, rtol=tol, atol=tol)


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("merge", [True, False])
def test_context_parallel_attention_equals_the_plain_model(one_rank, monkeypatch, merge):
    if not merge:  # the masked path CUDA and dropout take
        monkeypatch.setattr(blockwise, "available", lambda q, p: False)
    cfg = ModelConfig(hidden_size=64, num_attention_heads=4, num_kv_attention_heads=2, num_layers=2,
                      vocab_size=97, multiple_of=16, max_position_embeddings=64)
    plain, wrapped = build_model(cfg.to_args(), seed=1), build_model(cfg.to_args(), seed=1)
    cp = ContextParallel(wrapped, one_rank)
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (2, 32))
    # documents crossing the middle (the chunk edge) in row 0, one whole-row document in row 1
    pos = torch.cat([torch.cat([torch.arange(5), torch.arange(20), torch.arange(7)])[None], torch.arange(32)[None]])
    labels = torch.roll(ids, -1, 1)
    ref = plain(ids, pos, labels=labels)
    out = cp(ids, pos, labels=labels)
    # the rank holds chunks 0 and 1 of 2: all tokens, in order
    torch.testing.assert_close(out.token_loss, ref.token_loss, rtol=1e-5, atol=1e-6)
    ref.loss_sum.backward()
    out.loss_sum.backward()
    for (name, a), b in zip(wrapped.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
