"""Generation with the KV cache: greedy == full-forward argmax, sampling supports, EOS, batches, Dynamic NTK."""

import pytest
import torch

from spindle.config import ModelConfig
from spindle.eval.generate import generate, generate_stream, sample_next
from spindle.eval.prefill import prefill
from spindle.eval.perplexity import set_rope
from spindle.model.llama import KVCache, build_model

V = 50


def tiny(max_pos=16, seed=0):
    cfg = ModelConfig(hidden_size=32, num_attention_heads=2, num_kv_attention_heads=1, num_layers=2, vocab_size=V,
                      mlp_ratio=2, multiple_of=16, max_position_embeddings=max_pos, init_std=0.2)
    return build_model(cfg.to_args(), seed=seed).eval()


def greedy_by_full_forward(model, prompt, n, seq_len_of=lambda L: L):
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids]), seq_len=seq_len_of(len(ids)))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_with_cache_equals_argmax_of_full_forward():
    model = tiny()
    prompt = [3, 14, 15, 9, 2, 6, 5]
    assert generate(model, [prompt], 12) == [greedy_by_full_forward(model, prompt, 12)]


def test_chunked_prefill_gives_the_same_last_logits():
    model = tiny()
    ids = torch.randint(0, V, (2, 23))
    with torch.no_grad():
        full = model(ids)[:, -1]
    for chunk in (1, 5, 100):
        assert torch.allclose(prefill(model, ids, KVCache(), chunk=chunk), full, atol=1e-5)


def test_top_k_and_top_p_restrict_the_support():
    torch.manual_seed(0)
    logits = torch.randn(1, V).repeat(400, 1)
    gen = torch.Generator().manual_seed(1)
    top3 = set(torch.topk(logits[0], 3).indices.tolist())
    got = set(sample_next(logits, temperature=1.0, top_k=3, generator=gen).tolist())
    assert got <= top3 and len(got) > 1
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05] + [0.0] * (V - 4)]).clamp(min=1e-12).log().repeat(400, 1)
    got = set(sample_next(probs, temperature=1.0, top_p=0.7, generator=gen).tolist())
    assert got == {0, 1}  # 0.5 < 0.7 so token 1 is kept; 0.8 >= 0.7 so token 2 is dropped
    assert sample_next(probs, temperature=0.0).tolist() == [0] * 400


def test_sampling_is_seeded():
    model = tiny()
    a = generate(model, [[1, 2, 3]], 10, temperature=1.0, top_p=0.9, seed=5)
    b = generate(model, [[1, 2, 3]], 10, temperature=1.0, top_p=0.9, seed=5)
    assert a == b


def test_eos_stops_and_batch_returns_per_sequence_outputs():
    model = tiny()
    p1, p2 = [1, 2, 3, 4], [7, 8, 9, 10]
    g1, g2 = greedy_by_full_forward(model, p1, 8), greedy_by_full_forward(model, p2, 8)
    assert generate(model, [p1, p2], 8) == [g1, g2]
    eos = g1[2]
    out = generate(model, [p1, p2], 8, eos_id=eos)
    assert out[0] == g1[: g1.index(eos)]
    assert out[1] == (g2[: g2.index(eos)] if eos in g2 else g2)
    steps = list(generate_stream(model, [p1], 8, eos_id=g1[0]))
    assert len(steps) == 1  # stops right after the first EOS


def test_batch_api_accepts_prompts_of_different_lengths():
    model = tiny()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11]]
    out = generate(model, prompts, 6)
    assert out == [greedy_by_full_forward(model, p, 6) for p in prompts]


def test_dynamic_ntk_changes_logits_only_past_the_original_length():
    plain = tiny(max_pos=16)
    dyn = set_rope(tiny(max_pos=16), {"type": "dynamic", "factor": 1.0}, None)
    ids = torch.randint(0, V, (1, 30))
    with torch.no_grad():
        assert torch.allclose(plain(ids[:, :16]), dyn(ids[:, :16]), atol=1e-6)
        a, b = plain(ids), dyn(ids)  # seq_len 30 > 16: a larger base everywhere
    assert not torch.allclose(a, b, atol=1e-4)
    # generation: the tokens chosen while the context is <= 16 agree; the model follows the growing context
    prompt = ids[0, :10].tolist()
    gp, gd = generate(plain, [prompt], 14), generate(dyn, [prompt], 14)
    assert gp[0][:7] == gd[0][:7]
    assert gd == [greedy_by_full_forward(dyn, prompt, 14)]


def test_complete_text_streams_and_rejects_a_tokenizer_larger_than_the_vocab():
    from spindle.data.tokenizer import load_tokenizer
    from spindle.errors import SpindleError
    from spindle.eval.generate import complete_text

    tok = load_tokenizer("byte")
    with pytest.raises(SpindleError, match="vocabulary of 50 entries"):
        complete_text(tiny(), tok, "hello", 4)
    cfg = ModelConfig(hidden_size=32, num_attention_heads=2, num_layers=1, vocab_size=258, multiple_of=16,
                      max_position_embeddings=16, init_std=0.2)
    model = build_model(cfg.to_args()).eval()
    pieces = []
    text = complete_text(model, tok, "ab", 6, stream=pieces.append)
    assert "".join(pieces) == text


def test_compiled_blocks_decode_eagerly_without_recompiling():
    """trainer.compile wraps every block in torch.compile (static shapes): decoding through them would
    compile again at every cache length. The forward with a cache runs them eagerly instead: no graph is
    compiled while generating, and the tokens are the eager model's."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from spindle.parallel.parallelize import apply_compile

    model, eager = tiny(max_pos=32), tiny(max_pos=32)
    apply_compile(model, backend="eager")  # dynamo's capture and guards without Inductor's codegen
    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids), eager(ids))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # the training-shaped forward went through the compiled blocks
    prompt = [3, 14, 15, 9, 2, 6, 5]
    assert generate(model, [prompt], 12) == generate(eager, [prompt], 12)
    assert counters["stats"]["unique_graphs"] == graphs
