"""Attention kernels: layouts from position_ids, the kernel choice, and every CPU path against the mask."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spindle.config import ModelConfig
from spindle.data.packing import PackedDocuments
from spindle.model import attention as A
from spindle.model.llama import build_model


class Docs:
    """Documents of given lengths with random tokens (the packing Protocol)."""

    def __init__(self, lengths, vocab=97, seed=0):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.rng = np.random.default_rng(seed)
        self.tokens = [self.rng.integers(0, vocab, n) for n in self.lengths]

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return self.tokens[i], None


def layout_of(lengths_per_row, device="cpu"):
    """A layout from per-row document lengths, through position_ids as a batch carries them."""
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row])
    return A.document_layout(pos.to(device))


def qkv(b, h, hkv, l, d=8, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, l, d, generator=g) for n in (h, hkv, hkv))
    # kernels receive (B, H, L, D) views of (B, L, H, D) tensors, as Attention.forward makes them
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    return [t.requires_grad_(grad) for t in (q, k, v)]


def mask_of(layout):
    return A.packed_causal_mask(layout.cu_seqlens, layout.batch, layout.length)


# ----------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("micro_bsz,seq_len", [(1, 64), (3, 32), (2, 7)])
def test_layout_from_position_ids_equals_the_packers_documents(micro_bsz, seq_len):
    docs = Docs(np.random.default_rng(1).integers(1, 50, 60))
    packs = PackedDocuments(docs, seq_len, micro_bsz, seed=3)
    for i in range(min(len(packs), 6)):
        p = packs[i]
        layout = A.document_layout(torch.from_numpy(p.position_ids))
        # the packer's own boundaries: where its stream starts a document, and every row start
        _, _, _, starts = packs._stream(i * packs.packed_length, (i + 1) * packs.packed_length)
        starts[::seq_len] = True
        want = np.append(np.nonzero(starts)[0], starts.size)
        assert list(layout.lengths) == np.diff(want).tolist()
        assert layout.cu_seqlens.tolist() == want.tolist()


def test_concat_packs_and_missing_positions_are_dense():
    docs = Docs([5, 9, 30, 2, 40])
    p = PackedDocuments(docs, 16, 2, pack_into_one=True)[0]
    assert A.document_layout(torch.from_numpy(p.position_ids)).dense
    # a row that does not start at position 0 (a context-parallel slice) still starts a document
    layout = A.document_layout(torch.tensor([[5, 6, 0, 1], [2, 3, 4, 5]]))
    assert layout.lengths == (2, 2, 4) and not layout.dense


def test_groups_gather_documents_of_one_length_and_invert():
    layout = layout_of([[3, 2, 3], [2, 6]])
    sizes = [n for n, _ in layout.groups]
    assert sizes == [6, 3, 2]
    index = torch.cat([i for _, i in layout.groups])
    assert index.tolist() == [10, 11, 12, 13, 14, 15, 0, 1, 2, 5, 6, 7, 3, 4, 8, 9]
    assert torch.equal(index[layout.inverse], torch.arange(16))
    assert layout_of([[4, 4], [4, 4]]).groups == ((4, None),)  # one length: no gather at all


# ----------------------------------------------------------------------------------- the choice


def test_choose_kernel_for_every_device_dtype_and_layout():
    dense, packed = layout_of([[8], [8]]), layout_of([[3, 5], [8]])
    cached = A.cached_layout(2, 4, "cpu")
    choose = A.choose_kernel
    assert choose("cpu", torch.float32, dense) == ("sdpa_causal", True)
    assert choose("cpu", torch.float32, packed) == ("segments", True)
    assert choose("cpu", torch.bfloat16, packed, 0.1) == ("segments", True)
    assert choose("cpu", torch.float32, cached) == ("cached", True)
    assert choose("cuda", torch.bfloat16, dense) == ("sdpa_causal", True)
    assert choose("cuda", torch.float32, dense) == ("sdpa_causal", False)  # no GQA in the fp32 kernel
    assert choose("cuda", torch.bfloat16, packed) == ("varlen", True)
    assert choose("cuda", torch.float16, packed) == ("varlen", True)
    assert choose("cuda", torch.bfloat16, packed, 0.1) == ("segments", True)  # varlen has no dropout
    assert choose("cuda", torch.float32, packed) == ("segments", False)  # flash needs half precision
    assert choose("cuda", torch.bfloat16, cached) == ("cached", False)
    assert choose("mps", torch.float32, packed) == ("segments", False)


def test_attention_runs_the_chosen_kernel(monkeypatch):
    calls = []
    for name in A.KERNELS:
        monkeypatch.setitem(A.KERNELS, name, lambda q, k, v, layout, p, name=name: calls.append((name, k.shape[1])))
    q, k, v = qkv(1, 4, 2, 8, grad=False)
    A.attention(q, k, v, layout_of([[3, 5]]))
    A.attention(q, k, v, layout_of([[8]]))
    monkeypatch.setattr(A, "choose_kernel", lambda *a: A.Kernel("varlen", False))
    A.attention(q, k, v, layout_of([[3, 5]]))
    assert calls == [("segments", 2), ("sdpa_causal", 2), ("varlen", 4)]  # not native: keys repeated


# ----------------------------------------------------------------------------------- exactness


def grads_of(fn, tensors):
    out = fn(*tensors)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    g = torch.autograd.grad((out * weights).sum(), tensors)
    return out.detach(), g


@pytest.mark.parametrize("rows", [[[3, 5, 1, 7]], [[4, 4, 4, 4], [8, 8]], [[1] * 16, [16]], [[9, 2, 5], [2, 9, 5]]])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2)])
def test_segments_equal_the_masked_path_with_gradients(rows, heads):
    layout = layout_of(rows)
    tensors = qkv(len(rows), *heads, 16)
    out, grads = grads_of(lambda q, k, v: A.attention(q, k, v, layout), tensors)
    ref, ref_grads = grads_of(lambda q, k, v: A.masked_attention(q, k, v, mask_of(layout)), tensors)
    assert A.choose_kernel("cpu", torch.float32, layout).name == "segments"
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


def test_native_gqa_equals_repeated_keys():
    q, k, v = qkv(2, 6, 2, 12, grad=False)
    ref = F.scaled_dot_product_attention(q, A.repeat_kv(k, 3), A.repeat_kv(v, 3), is_causal=True)
    torch.testing.assert_close(A.attention(q, k, v, A.dense_layout(2, 12, "cpu")), ref, atol=1e-6, rtol=1e-5)


def fake_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1),
                     enable_gqa=False, **_):
    """varlen_attn's documented contract, computed per sequence on CPU: (T, H, D) inputs, causal for
    window (-1, 0), GQA by enable_gqa; it also checks the maxima it is given."""
    bounds = cu_seq_q.tolist()
    assert cu_seq_q.dtype == torch.int32 and cu_seq_k is cu_seq_q
    assert max_q == max_k == max(b - a for a, b in zip(bounds, bounds[1:]))
    assert window_size == (-1, 0)
    outs = []
    for a, b in zip(bounds, bounds[1:]):
        q, k, v = (t[a:b].transpose(0, 1)[None] for t in (query, key, value))
        outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)[0].transpose(0, 1))
    return torch.cat(outs)


def fake_varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                          window_size=(-1, -1)):
    """torch 2.11's signature (the CUDA image of the lent H200s): no enable_gqa, so equal head counts."""
    assert key.shape[1] == query.shape[1], "2.11's varlen_attn has no GQA: the KV heads come repeated"
    return fake_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size=window_size)


@pytest.mark.parametrize("fake", [fake_varlen_attn, fake_varlen_attn_2_11], ids=["torch2.13", "torch2.11"])
def test_varlen_plumbing_against_its_documented_contract(monkeypatch, fake):
    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen, "varlen_attn", fake)
    layout = layout_of([[3, 5, 8], [10, 6]])
    tensors = qkv(2, 4, 2, 16)
    out, grads = grads_of(lambda q, k, v: A.KERNELS["varlen"](q, k, v, layout, 0.0), tensors)
    ref, ref_grads = grads_of(lambda q, k, v: A.masked_attention(q, k, v, mask_of(layout)), tensors)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


def lower_right_mask(lq, lk):
    return torch.arange(lk)[None, :] <= torch.arange(lk - lq, lk)[:, None]


@pytest.mark.parametrize("lq,lk", [(1, 9), (5, 5), (4, 13), (7, 8)])
@pytest.mark.parametrize("lse_merge", [True, False])
def test_cached_attention_is_lower_right_causal(lq, lk, lse_merge, monkeypatch):
    if not lse_merge:  # the public fallback: SDPA with causal_lower_right
        monkeypatch.setattr(A, "_CPU_FLASH", None)
    g = torch.Generator().manual_seed(lq * 100 + lk)
    q = torch.randn(2, 4, lq, 8, generator=g)
    k, v = torch.randn(2, 2, lk, 8, generator=g), torch.randn(2, 2, lk, 8, generator=g)
    out = A.attention(q, k, v, A.cached_layout(2, lq, "cpu"))
    ref = A.masked_attention(q, k, v, lower_right_mask(lq, lk)[None, None])
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------- the model


def tiny(**kw):
    return ModelConfig(**{**dict(hidden_size=64, num_attention_heads=4, num_kv_attention_heads=2, num_layers=2,
                                 vocab_size=97, multiple_of=16, max_position_embeddings=64), **kw}).to_args()


def masked_kernel(cu_seqlens, batch, length):
    mask = A.packed_causal_mask(cu_seqlens, batch, length)
    return lambda q, k, v, layout, p=0.0: A.masked_attention(q, k, v, mask, p)


def test_model_logits_and_gradients_equal_the_masked_path():
    docs = Docs(np.random.default_rng(5).integers(1, 40, 40), vocab=97)
    p = PackedDocuments(docs, 48, 2, seed=1)[0]
    ids, pos, labels = (torch.from_numpy(x) for x in (p.input_ids, p.position_ids, p.labels))
    cu = A.document_layout(pos).cu_seqlens
    assert len(cu) > 4  # several documents per row

    def run(model):
        out = model(ids, pos, labels=labels)
        out.loss_sum.backward()
        logits = model(ids, pos).detach()
        return logits, {n: q.grad.clone() for n, q in model.named_parameters()}

    new = build_model(tiny(), seed=4)
    ref = build_model(tiny(), seed=4)
    for block in ref.layers.values():
        block.attention.kernel = masked_kernel(cu, *ids.shape)
    logits, grads = run(new)
    ref_logits, ref_grads = run(ref)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_the_layout_is_computed_once_per_forward(monkeypatch):
    import spindle.model.llama as llama

    calls = []
    real = llama.document_layout
    monkeypatch.setattr(llama, "document_layout", lambda pos: calls.append(1) or real(pos))
    model = build_model(tiny(num_layers=3))
    pos = torch.cat([torch.arange(5), torch.arange(11)])[None]
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 16)), pos)
    assert calls == [1]


def test_bench_attention_cases_run_their_kernels_and_agree():
    from spindle.cli.bench import load_script

    bench = load_script("attention")
    rows = bench.run([2048], ["dense", "packed", "masked", "mix"], reps=1, device="cpu", threads=1, steps=1,
                     warmup=0, max_masked=2048)
    by_case = {r["case"]: r for r in rows}
    assert {c: r["kernel"] for c, r in by_case.items()} == {"dense": "sdpa_causal", "packed": "segments",
                                                            "masked": "masked", "mix": "segments"}
    assert by_case["packed"]["documents"] == 2 and by_case["mix"]["documents"] >= 2
    # the same row through the new kernel and through the mask: the same loss
    assert by_case["packed"]["loss"] == pytest.approx(by_case["masked"]["loss"], rel=1e-5)
    lines = bench.ratio_lines(bench.summarize(rows))
    assert lines[0].startswith("  2048 tokens: packed/dense time ratio ") and "memory ratio" in lines[0]
