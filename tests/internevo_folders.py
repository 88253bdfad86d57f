"""InternEvo checkpoint folders for the tests: shards cut exactly as InternEvo saves them, from a random
transformers Llama (the reference logits). Used by tests/unit/test_internevo_ckpt.py and by the sharded-load
layout test (tests/distributed/layout_data.py). Nothing of InternEvo is imported or run."""

from __future__ import annotations

import contextlib
import sys
import types

import torch
import transformers

H, HEADS, LAYERS, VOCAB, FFN, HD = 64, 4, 4, 96, 96, 16
X = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))


def reference(kv_heads: int, bias: bool, seed: int = 2, ffn: int = FFN):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=ffn, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, num_key_value_heads=kv_heads, rms_norm_eps=1e-5,
                                   max_position_embeddings=64, attention_bias=bias, mlp_bias=False,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = transformers.LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.15 * torch.randn(p.shape, generator=gen))
    return model


def to_interleaved(w: torch.Tensor) -> torch.Tensor:
    """Inverse of the rotate_half permutation: per head, rows (i, i + d/2) -> (2i, 2i + 1)."""
    x = w.reshape(-1, HD, *w.shape[1:])
    out = torch.empty_like(x)
    out[:, 0::2], out[:, 1::2] = x[:, : HD // 2], x[:, HD // 2:]
    return out.reshape(w.shape)


def internevo_full(model_type: str, sd: dict, kv_heads: int, interleaved: bool) -> dict:
    """The whole model in InternEvo's global names (layer index = global index), unsharded."""
    full = {}
    for i in range(LAYERS):
        hf = {k.split(f"model.layers.{i}.")[1]: v for k, v in sd.items() if k.startswith(f"model.layers.{i}.")}
        q, k, v = hf["self_attn.q_proj.weight"], hf["self_attn.k_proj.weight"], hf["self_attn.v_proj.weight"]
        if interleaved:
            q, k = to_interleaved(q), to_interleaved(k)
        if model_type == "INTERNLM":
            b = f"blocks.{i}."
            full[b + "mixer.Wqkv.weight"] = torch.cat([q, k, v])
            full[b + "mixer.Wqkv.bias"] = torch.cat([hf[f"self_attn.{x}_proj.bias"] for x in "qkv"])
            full[b + "mixer.out_proj.weight"] = hf["self_attn.o_proj.weight"]
            full[b + "mixer.out_proj.bias"] = hf["self_attn.o_proj.bias"]
            full[b + "mlp.w1.weight"] = hf["mlp.gate_proj.weight"]
            full[b + "mlp.w2.weight"] = hf["mlp.up_proj.weight"]  # v1: w2 up, w3 down
            full[b + "mlp.w3.weight"] = hf["mlp.down_proj.weight"]
            full[b + "norm1.weight"] = hf["input_layernorm.weight"]
            full[b + "norm2.weight"] = hf["post_attention_layernorm.weight"]
            continue
        b = f"layers.{i}."
        if model_type == "INTERNLM2_PUBLIC":
            q_per_kv = HEADS // kv_heads
            rows = []
            for g in range(kv_heads):
                rows += [q[(g * q_per_kv + j) * HD:(g * q_per_kv + j + 1) * HD] for j in range(q_per_kv)]
                rows += [k[g * HD:(g + 1) * HD], v[g * HD:(g + 1) * HD]]
            full[b + "attention.wqkv.weight"] = torch.cat(rows)
        else:
            full.update({b + "attention.wq.weight": q, b + "attention.wk.weight": k, b + "attention.wv.weight": v})
        full[b + "attention.wo.weight"] = hf["self_attn.o_proj.weight"]
        full[b + "feed_forward.w1.weight"] = hf["mlp.gate_proj.weight"]
        full[b + "feed_forward.w3.weight"] = hf["mlp.up_proj.weight"]
        full[b + "feed_forward.w2.weight"] = hf["mlp.down_proj.weight"]
        full[b + "attention_norm.weight"] = hf["input_layernorm.weight"]
        full[b + "ffn_norm.weight"] = hf["post_attention_layernorm.weight"]
    emb, head = ("embedding.weight", "head.weight") if model_type == "INTERNLM" else ("tok_embeddings.weight",
                                                                                       "output.weight")
    full.update({emb: sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
                 head: sd["lm_head.weight"]})
    return full


def shard_of(name: str, t: torch.Tensor, tp: int, rank: int, split_hidden: bool) -> torch.Tensor:
    """What tensor rank `rank` of `tp` holds of a full tensor (InternEvo's column/row parallel layers)."""
    if tp == 1 or name.endswith("norm.weight") or name.endswith(("norm1.weight", "norm2.weight")) \
            or name.endswith(("out_proj.bias", "wo.bias")):
        return t
    if "Wqkv" in name:  # (3, heads, head_dim, ...) -> this rank's heads of q, k and v
        parts = t.reshape(3, HEADS, HD, *t.shape[1:]).chunk(tp, dim=1)[rank]
        return parts.reshape(-1, *t.shape[1:])
    row_parallel = name.endswith(("out_proj.weight", "wo.weight", "feed_forward.w2.weight", "mlp.w3.weight"))
    if name in ("embedding.weight", "tok_embeddings.weight"):
        row_parallel = split_hidden
    return t.chunk(tp, dim=1 if row_parallel else 0)[rank].clone()


def stages(pp: int) -> list[range]:
    bounds = [round(LAYERS * s / pp) for s in range(pp + 1)]
    return [range(bounds[s], bounds[s + 1]) for s in range(pp)]


NAMES = ["internlm", "internlm.core", "internlm.core.context", "internlm.core.context.parallel_context"]


@contextlib.contextmanager
def internevo_config_class():
    """A dict subclass that pickles as InternEvo's internlm.core.context.parallel_context.Config (its modules
    stand in sys.modules while the block runs)."""
    saved = {n: sys.modules.get(n) for n in NAMES}
    try:
        for n in NAMES:
            sys.modules[n] = types.ModuleType(n)
        config = type("Config", (dict,), {"__module__": NAMES[-1]})
        sys.modules[NAMES[-1]].Config = config
        yield config
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def write_internevo(folder, model_type, full, tp, pp, config, step=41, split_hidden=False):
    folder.mkdir(parents=True)
    emb = "embedding.weight" if model_type == "INTERNLM" else "tok_embeddings.weight"
    for s, layers in enumerate(stages(pp)):
        for r in range(tp):
            shard = {}
            for name, t in full.items():
                parts = name.split(".")
                if parts[0] in ("blocks", "layers"):  # stage-local layer index, as each stage's module list
                    if int(parts[1]) not in layers:
                        continue
                    local = ".".join([parts[0], str(int(parts[1]) - layers.start), *parts[2:]])
                elif (name == emb and s != 0) or (name != emb and s != pp - 1):
                    continue  # the embedding lives on the first stage, norm and head on the last
                else:
                    local = name
                shard["model." + local] = shard_of(name, t, tp, r, split_hidden)  # NaiveAMPModel's prefix
            torch.save(shard, folder / f"model_tp{r}_pp{s}.pt")
    torch.save(config, folder / "model_config.pt")
    torch.save({"batch_count": step, "num_consumed_samples_in_epoch": 9, "num_consumed_tokens": 123456,
                "inf_nan_skip_batches": 1, "step_count": step, "tensorboard_folder": None}, folder / "context.pt")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=95)
    for _ in range(step - 5):
        opt.step()
        cosine.step()
    torch.save({"warmup_epochs": 5, "finished": True, "last_epoch": 5, "base_lrs": [1e-3], "_step_count": 6,
                "after_scheduler_type": "CosineAnnealingLR", "after_scheduler_dict": cosine.state_dict()},
               folder / "schedulder.pt")
    torch.save({"batch_count": step, "epoch": 0}, folder / "sampler.pt")
    torch.save({"grad_scaler": {}, "base_optim_states": {"state": {}, "param_groups": []}}, folder /
               "optimizer_tp0_pp0_zo0.pt")
    torch.save(f"model_type = {model_type!r}\nmodel = dict(hidden_size={H})\n", folder / "config_file.pt")
    torch.save({"step": step}, folder / f"{step}.step")


CASES = {  # name: (model_type, kv_heads, bias, adapt_hf in model_config.pt (None: absent), interleaved weights)
    "internlm_v1": ("INTERNLM", 4, True, None, False),
    "internlm2_adapt_hf": ("INTERNLM2_PUBLIC", 2, False, True, False),
    "internlm2_not_adapt_hf": ("INTERNLM2_PUBLIC", 2, False, False, True),
    "internlm2_default": ("INTERNLM2_PUBLIC", 2, False, None, False),  # builder default adapt_hf=True
    "llama2_default": ("LLAMA2", 2, False, None, True),  # builder default adapt_hf=False: interleaved
    "llama2_adapt_hf": ("LLAMA2", 2, False, True, False),
}


def make_case(tmp_path, config_class, case, tp, pp, split_hidden=False):
    model_type, kv, bias, adapt_hf, interleaved = CASES[case]
    ref = reference(kv, bias)
    full = internevo_full(model_type, ref.state_dict(), kv, interleaved)
    config = config_class(num_attention_heads=HEADS, hidden_size=H, num_layers=LAYERS, vocab_size=VOCAB,
                          mlp_ratio=FFN / H, layer_norm_epsilon=1e-5, dtype=torch.bfloat16, num_chunks=1,
                          embed_split_hidden=split_hidden, checkpoint=False)
    if model_type != "INTERNLM":
        config["num_kv_attention_heads"] = kv
        config["no_bias"] = True
    if adapt_hf is not None:
        config["adapt_hf"] = adapt_hf
    folder = tmp_path / f"{case}_tp{tp}_pp{pp}" / "41"
    write_internevo(folder, model_type, full, tp, pp, config, split_hidden=split_hidden)
    with torch.no_grad():
        want = ref(X).logits
    return folder, want
