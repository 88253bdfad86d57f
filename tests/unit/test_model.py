"""The model: causality, packed-document isolation, GQA, init, dtypes, options."""

import pytest
import torch

from spindle.config import ModelConfig
from spindle.model.attention import packed_causal_mask
from spindle.model.llama import KVCache, build_model, count_parameters
from spindle.model.flops import parameter_counts


def tiny(**kw):
    base = dict(hidden_size=64, num_attention_heads=4, num_kv_attention_heads=2, num_layers=2, vocab_size=97,
                mlp_ratio=8 / 3, multiple_of=16, max_position_embeddings=64)
    return ModelConfig(**{**base, **kw})


def test_causal_future_tokens_do_not_change_past_logits():
    model = build_model(tiny().to_args())
    x = torch.randint(0, 97, (2, 24))
    y = x.clone()
    y[:, 15:] = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :15], b[:, :15], atol=1e-6)
    assert not torch.allclose(a[:, 15:], b[:, 15:], atol=1e-3)


def pack(docs, length):
    """Concatenate documents into one row with restarting positions and cu_seqlens."""
    ids = torch.cat(docs)
    assert ids.numel() == length
    pos = torch.cat([torch.arange(d.numel()) for d in docs])
    cu = torch.tensor([0] + torch.tensor([d.numel() for d in docs]).cumsum(0).tolist(), dtype=torch.int32)
    return ids[None], pos[None], cu


def test_changing_one_document_leaves_the_others_unchanged():
    torch.manual_seed(0)
    model = build_model(tiny().to_args())
    docs = [torch.randint(0, 97, (n,)) for n in (7, 12, 5, 8)]
    ids, pos, cu = pack(docs, 32)
    changed = list(docs)
    changed[1] = torch.randint(0, 97, (12,))  # the second document only
    ids2, pos2, cu2 = pack(changed, 32)
    with torch.no_grad():
        a = model(ids, pos)
        b = model(ids2, pos2)
    spans = [(0, 7), (7, 19), (19, 24), (24, 32)]
    for k, (s, e) in enumerate(spans):
        same = torch.allclose(a[0, s:e], b[0, s:e], atol=1e-6)
        assert same == (k != 1), k
    # and each document's logits equal running that document alone
    with torch.no_grad():
        alone = model(docs[2][None])
    assert torch.allclose(a[0, 19:24], alone[0], atol=1e-5)


def test_packed_rows_in_a_batch():
    model = build_model(tiny().to_args())
    ids = torch.randint(0, 97, (2, 16))
    pos = torch.cat([torch.arange(10), torch.arange(6)]).repeat(2, 1)
    cu = torch.tensor([0, 10, 16, 26, 32], dtype=torch.int32)  # flattened (2*16) boundaries
    mask = packed_causal_mask(cu, 2, 16)
    assert mask.shape == (2, 1, 16, 16)
    assert not mask[0, 0, 12, 5] and mask[0, 0, 12, 11] and mask[1, 0, 9, 0] and not mask[1, 0, 3, 4]
    with torch.no_grad():
        out = model(ids, pos)
        first = model(ids[1:, 10:])
    assert torch.allclose(out[1, 10:], first[0], atol=1e-5)


def test_kv_cache_matches_full_forward_in_chunks():
    model = build_model(tiny().to_args(), seed=3)
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache()
        parts = [model(ids[:, s:e], torch.arange(s, e).expand(2, e - s), cache=cache) for s, e in
                 ((0, 7), (7, 8), (8, 20))]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_meta_init_is_seeded_and_layout_independent():
    a, b, c = (build_model(tiny().to_args(), seed=1), build_model(tiny().to_args(), seed=1),
               build_model(tiny().to_args(), seed=2))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["layers.0.attention.wq.weight"], sc["layers.0.attention.wq.weight"])
    # a deeper model initialises its shared layers identically (per-name generators)
    deep = build_model(tiny(num_layers=3).to_args(), seed=1).state_dict()
    assert torch.equal(deep["tok_embeddings.weight"], sa["tok_embeddings.weight"])
    assert list(a.layers.keys()) == ["0", "1"]


def test_gqa_shapes_and_parameter_count():
    cfg = tiny()
    model = build_model(cfg.to_args())
    assert model.layers["0"].attention.wk.weight.shape == (2 * 16, 64)
    assert count_parameters(model) == parameter_counts(cfg)["total"]
    for kw in (dict(norm_type="layernorm", no_bias=False), dict(tie_word_embeddings=True),
               dict(use_swiglu=False), dict(num_kv_attention_heads=None)):
        c = tiny(**kw)
        m = build_model(c.to_args())
        assert count_parameters(m) == parameter_counts(c)["total"], kw
    tied = build_model(tiny(tie_word_embeddings=True).to_args())
    assert tied.output.weight is tied.tok_embeddings.weight


def test_layernorm_and_post_norm_change_the_computation():
    """apply_post_layer_norm puts each block's norms after the residual adds: a block's output is then
    LayerNorm's (zero mean, unit variance per token at init), which the pre-norm block's is not; and
    LayerNorm with a bias is F.layer_norm."""
    post = build_model(tiny(norm_type="layernorm", no_bias=False, apply_post_layer_norm=True).to_args(), seed=3)
    pre = build_model(tiny(norm_type="layernorm", no_bias=False).to_args(), seed=3)
    assert isinstance(post.norm, torch.nn.LayerNorm) and isinstance(post.layers["0"].ffn_norm, torch.nn.LayerNorm)
    seen = {}
    for name, m in (("post", post), ("pre", pre)):
        m.layers["0"].register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, out))
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        out_post, out_pre = post(ids), pre(ids)
    assert out_post.shape == (1, 8, 97) and torch.isfinite(out_post).all()
    assert not torch.allclose(out_post, out_pre, atol=1e-3)  # same weights, other ordering
    h = seen["post"]
    assert h.mean(-1).abs().max() < 1e-5 and (h.var(-1, unbiased=False) - 1).abs().max() < 1e-3
    h = seen["pre"]
    assert (h.var(-1, unbiased=False) - 1).abs().max() > 0.1
    norm = post.norm
    with torch.no_grad():
        norm.bias.normal_()
        norm.weight.normal_()
    x = torch.randn(3, 64)
    torch.testing.assert_close(norm(x), torch.nn.functional.layer_norm(x, (64,), norm.weight, norm.bias, 1e-5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_autocast_is_close_to_fp32(dtype):
    model = build_model(tiny().to_args())
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        ref = model(ids)
        with torch.autocast("cpu", dtype=dtype):
            low = model(ids)
    assert low.dtype == dtype
    assert (low.float() - ref).abs().max() < 0.05


def test_activation_checkpointing_recomputes_the_chosen_blocks_with_the_same_gradients():
    """checkpoint=0.5 recomputes the first half of the blocks in backward, True all of them (each
    recomputed block runs its attention twice per step), and the gradients do not change."""
    from spindle.config import validate_config
    from spindle.parallel.layout import Layout
    from spindle.parallel.parallelize import parallelize

    ids = torch.randint(0, 97, (2, 12))
    grads, calls = [], []
    for ck in (False, 0.5, True):
        cfg = validate_config({"model": tiny(checkpoint=ck).model_dump()})
        model = build_model(cfg.model.to_args(), seed=5)
        count = {"0": 0, "1": 0}
        for name, block in model.layers.items():
            block.attention.register_forward_hook(lambda *_, name=name: count.__setitem__(name, count[name] + 1))
        wrapped = parallelize(model, cfg, Layout())
        wrapped(ids).float().pow(2).mean().backward()
        grads.append(model.tok_embeddings.weight.grad.clone())
        calls.append(count)
    assert calls == [{"0": 1, "1": 1}, {"0": 2, "1": 1}, {"0": 2, "1": 2}]
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and torch.allclose(grads[0], grads[2], atol=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_labels_give_the_fused_loss_of_the_logits(tied):
    """model(..., labels=) == cross-entropy of model(...) logits, values and parameter gradients."""
    torch.manual_seed(0)
    a, b = build_model(tiny(tie_word_embeddings=tied).to_args()), build_model(tiny(tie_word_embeddings=tied).to_args())
    x = torch.randint(0, 97, (2, 24))
    labels = torch.randint(0, 97, (2, 24))
    labels[:, :3] = -100
    out = a(x, labels=labels)
    out.loss_sum.backward()
    ref = torch.nn.functional.cross_entropy(b(x).flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    ref.backward()
    torch.testing.assert_close(out.loss_sum, ref, rtol=1e-5, atol=1e-5)
    assert out.token_loss.shape == (48,) and int((out.token_loss > 0).sum()) == 42
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- the family switches


def test_model_args_is_a_plain_dataclass_built_from_the_config():
    import dataclasses

    from spindle.model.llama import ModelArgs

    args = tiny(no_bias=False, o_bias=False).to_args()
    assert dataclasses.is_dataclass(args) and type(args) is ModelArgs
    assert (args.qkv_bias, args.o_bias, args.mlp_bias, args.norm_bias) == (True, False, True, True)
    assert (args.num_kv_heads, args.head_dim, args.ffn_hidden_size) == (2, 16, 176)


@pytest.mark.parametrize("kw, present, absent", [
    (dict(), (), ("attention.wq.bias", "attention.wo.bias", "feed_forward.w1.bias", "attention.q_norm.weight")),
    (dict(no_bias=False, o_bias=False, mlp_bias=False),  # Qwen2
     ("attention.wq.bias", "attention.wk.bias", "attention.wv.bias"),
     ("attention.wo.bias", "feed_forward.w1.bias", "feed_forward.w2.bias")),
    (dict(no_bias=False, mlp_bias=False),  # InternLM v1
     ("attention.wq.bias", "attention.wo.bias"), ("feed_forward.w1.bias", "feed_forward.w3.bias")),
    (dict(qk_norm=True, head_dim=24), ("attention.q_norm.weight", "attention.k_norm.weight"), ("attention.wq.bias",)),
])
def test_bias_and_qk_norm_switches_make_exactly_their_tensors(kw, present, absent):
    cfg = tiny(**kw)
    model = build_model(cfg.to_args())
    names = {n.removeprefix("layers.0.") for n, _ in model.named_parameters() if n.startswith("layers.0.")}
    assert set(present) <= names and not set(absent) & names
    assert count_parameters(model) == parameter_counts(cfg)["total"]
    for n, p in model.named_parameters():  # new tensors follow the init rules: biases 0, norms 1
        if n.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), n
        if "q_norm" in n or "k_norm" in n:
            assert torch.equal(p, torch.ones_like(p)), n


def test_explicit_head_dim_sets_projection_shapes_and_decodes_with_the_cache():
    cfg = tiny(head_dim=24, qk_norm=True)
    model = build_model(cfg.to_args(), seed=2)
    att = model.layers["0"].attention
    assert att.wq.weight.shape == (4 * 24, 64) and att.wk.weight.shape == (2 * 24, 64)
    assert att.wo.weight.shape == (64, 96) and att.q_norm.weight.shape == (24,)
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache()
        parts = [model(ids[:, s:e], torch.arange(s, e)[None], cache=cache) for s, e in ((0, 5), (5, 12))]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_qk_norm_makes_attention_invariant_to_the_scale_of_wq_and_wk():
    """RMSNorm over each head removes the scale of q and k: scaling wq/wk leaves the logits unchanged
    with qk_norm and changes them without (so the norm really runs on q and k, per head)."""
    ids = torch.randint(0, 97, (1, 10))
    for qk_norm in (True, False):
        model = build_model(tiny(qk_norm=qk_norm, layer_norm_epsilon=1e-12).to_args(), seed=4)
        with torch.no_grad():
            before = model(ids)
            for block in model.layers.values():
                block.attention.wq.weight.mul_(5.0)
                block.attention.wk.weight.mul_(3.0)
            after = model(ids)
        assert torch.allclose(before, after, atol=1e-4) == qk_norm


def test_sliding_window_is_exact_within_the_window_and_refused_beyond():
    from spindle.errors import SpindleError

    plain = build_model(tiny().to_args(), seed=1)
    windowed = build_model(tiny(sliding_window=16).to_args(), seed=1)
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert torch.equal(windowed(ids), plain(ids))
        # packed rows: only the longest document counts (each attends within itself)
        pos = torch.cat([torch.arange(12), torch.arange(12)])[None]
        windowed(torch.randint(0, 97, (1, 24)), pos)
        with pytest.raises(SpindleError, match="17 positions exceeds model.sliding_window=16"):
            windowed(torch.randint(0, 97, (1, 17)))
        cache = KVCache()
        windowed(ids[:1], cache=cache)
        with pytest.raises(SpindleError, match="sliding_window"):  # the cache counts
            windowed(ids[:1, :1], cache=cache)


def test_config_refuses_contradicting_switches():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="no_bias=True means no bias anywhere"):
        tiny(qkv_bias=True)
    with pytest.raises(ValidationError, match="head_dim .* must be even"):
        tiny(head_dim=15)
    with pytest.raises(ValidationError, match="or give head_dim"):
        tiny(hidden_size=60, num_attention_heads=8)
    assert tiny(hidden_size=60, num_attention_heads=8, num_kv_attention_heads=4, head_dim=16).head_dim == 16


def test_embed_grad_scale_scales_the_embedding_gradient_only():
    import torch

    from spindle.config import ModelConfig
    from spindle.model.llama import build_model

    base = dict(hidden_size=32, num_attention_heads=4, num_layers=1, vocab_size=64, multiple_of=16)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    grads, outs = {}, {}
    for scale in (1.0, 0.1):
        model = build_model(ModelConfig(**base, embed_grad_scale=scale).to_args(), seed=3)
        out = model(ids)
        out.square().mean().backward()
        grads[scale], outs[scale] = model.tok_embeddings.weight.grad, out.detach()
        other = model.layers["0"].attention.wq.weight.grad
        grads[(scale, "wq")] = other
    torch.testing.assert_close(outs[0.1], outs[1.0])  # the forward is unchanged
    torch.testing.assert_close(grads[0.1], grads[1.0] * 0.1)
    torch.testing.assert_close(grads[(0.1, "wq")], grads[(1.0, "wq")])
