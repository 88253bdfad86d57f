"""InternEvo checkpoint folders: shards cut here exactly as InternEvo saves them, read back by Spindle.

The fixture starts from a random transformers Llama (the reference logits), re-lays its weights out
in InternEvo's names and layouts for each model_type (fused Wqkv / grouped wqkv, w2/w3 roles,
interleaved q/k rows when adapt_hf=False), cuts them into tp x pp shards the way InternEvo's ranks
hold them (column-parallel rows, row-parallel columns, stage-local layer indices under `model.`),
and writes model_config.pt as a pickled InternEvo Config, context.pt, schedulder.pt, sampler.pt, an
optimizer file and the {step}.step marker. Nothing of InternEvo is imported or run.
"""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from spindle.checkpoint.internevo import is_internevo_folder, load_internevo_weights, read_internevo
from spindle.checkpoint.loading import load_checkpoint
from spindle.cli import main
from spindle.config import ModelConfig, validate_config
from spindle.model.llama import build_model

transformers = pytest.importorskip("transformers")

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
    full.update({emb: sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"], head: sd["lm_head.weight"]})
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


@pytest.fixture
def internevo_config_class(monkeypatch):
    """A dict subclass that pickles as InternEvo's internlm.core.context.parallel_context.Config."""
    names = ["internlm", "internlm.core", "internlm.core.context", "internlm.core.context.parallel_context"]
    for n in names:
        monkeypatch.setitem(sys.modules, n, types.ModuleType(n))
    config = type("Config", (dict,), {"__module__": names[-1]})
    sys.modules[names[-1]].Config = config
    return config


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
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 3)]


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


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("tp, pp", LAYOUTS)
def test_shards_merge_to_the_reference_logits(tmp_path, internevo_config_class, case, tp, pp):
    folder, want = make_case(tmp_path, internevo_config_class, case, tp, pp, split_hidden=tp == 2 and pp == 1)
    assert is_internevo_folder(folder)
    ck = read_internevo(folder)
    assert ck.model_type == CASES[case][0]
    mcfg = ModelConfig.model_validate(ck.model)
    model = build_model(mcfg.to_args())
    notes = load_internevo_weights(model, folder)
    with torch.no_grad():
        diff = (model.eval()(X) - want).abs().max().item()
    print(f"PARITY internevo {case} tp{tp} pp{pp}: {diff:.2e}")  # docs/interop.md (pytest -s)
    assert diff <= 1e-5, f"{case} tp{tp} pp{pp}: {diff:.2e}"
    assert any("adapt_hf" in n for n in notes) == (CASES[case][3] is None and case != "internlm_v1")
    # counters: resume at batch_count + 1, updates from the LR scheduler (warmup 5 + cosine 36)
    assert (ck.step, ck.updates, ck.num_consumed_tokens, ck.inf_nan_skip_batches) == (42, 41, 123456, 1)
    assert ck.optimizer is None and any("optimizer moments not mapped" in n for n in ck.notes)
    assert mcfg.dtype == "torch.bfloat16" and mcfg.kv_heads == CASES[case][1]


def test_from_internevo_cli_writes_a_spindle_checkpoint(tmp_path, internevo_config_class, capsys):
    folder, want = make_case(tmp_path, internevo_config_class, "internlm2_not_adapt_hf", 2, 2)
    out = tmp_path / "spindle"
    assert main(["convert", "from-internevo", str(folder), str(out)]) == 0
    assert (out / "42.step").is_file()
    state = json.loads((out / "42" / "trainer_state.json").read_text())
    assert (state["step"], state["updates"], state["num_consumed_tokens"]) == (42, 41, 123456)
    cfg = validate_config(json.loads((out / "42" / "config.json").read_text()))
    model = build_model(cfg.model.to_args())
    load_checkpoint(out / "42", model, None, ("model",))
    with torch.no_grad():
        assert (model.eval()(X) - want).abs().max().item() <= 1e-5
    printed = capsys.readouterr().out
    assert "tp=2 x pp=2" in printed and "sampler.pt is not read" in printed


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "model_tp0_pp0.pt").unlink(), "shard model_tp0_pp0.pt is missing"),
    (lambda f: (f / "model_tp1_pp0.pt").unlink(), "q projection has 32 rows, expected"),
    (lambda f: (f / "model_config.pt").unlink(), "no model_config.pt"),
    (lambda f: (f / "model_tp0_pp0.pt").write_bytes(b"not a zip"), "model_tp0_pp0.pt: not a readable torch"),
    (lambda f: (f / "model_tp0_pp0_dp0.pt").write_bytes(b""), "FSDP (_dp) model shards are not supported"),
    (lambda f: torch.save({"num_layers": 4, "hidden_size": "64"}, f / "model_config.pt"), "hidden_size must be"),
    (lambda f: torch.save({"num_chunks": 2}, f / "model_config.pt"), "num_chunks=2 is not supported"),
    (lambda f: torch.save("model_type = 'LLAMA2'", f / "config_file.pt"), "config_file.pt says model_type"),
])
def test_bad_folders_are_one_line(tmp_path, internevo_config_class, capsys, damage, message):
    folder, _ = make_case(tmp_path, internevo_config_class, "internlm_v1", 2, 1)
    damage(folder)
    assert main(["convert", "from-internevo", str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_pickled_code_in_a_shard_is_refused(tmp_path, internevo_config_class, capsys):
    folder, _ = make_case(tmp_path, internevo_config_class, "internlm_v1", 1, 1)
    torch.save({"x": types.SimpleNamespace(a=1)}, folder / "model_tp0_pp0.pt")
    assert main(["convert", "from-internevo", str(folder), str(tmp_path / "out")]) == 2
    assert "not a readable torch model shard" in capsys.readouterr().err


# --------------------------------------------------------------------------- ckpt_type="llama": Meta's folders


def test_meta_consolidated_folder_merges_model_parallel_files(tmp_path):
    from spindle.checkpoint.meta import load_meta_weights, read_meta

    ref = reference(2, False, ffn=176)  # Meta's rule: int(2 * 4 * 64 / 3) = 170 -> multiple_of 16 -> 176
    sd = ref.state_dict()
    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"], "rope.freqs": torch.zeros(HD // 2)}
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(LAYERS):
        for ours, hf in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            meta[f"layers.{i}.{ours}.weight"] = to_interleaved(t) if ours in ("attention.wq", "attention.wk") else t
    folder = tmp_path / "meta"
    folder.mkdir()
    for r in range(2):  # Meta's model parallel: column-parallel rows, row-parallel (and embedding) columns
        shard = {}
        for name, t in meta.items():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")):
                shard[name] = t.chunk(2, dim=1)[r].clone()
            elif t.dim() == 2 and not name.endswith("norm.weight"):
                shard[name] = t.chunk(2, dim=0)[r].clone()
            else:
                shard[name] = t
        torch.save(shard, folder / f"consolidated.{r:02d}.pth")
    (folder / "params.json").write_text(json.dumps({"dim": H, "n_layers": LAYERS, "n_heads": HEADS, "n_kv_heads": 2,
                                                    "vocab_size": -1, "multiple_of": 16, "norm_eps": 1e-5}))
    cfg, _ = read_meta(folder)
    mcfg = ModelConfig.model_validate(cfg)
    assert mcfg.ffn_hidden_size == 176 and mcfg.vocab_size == VOCAB
    model = build_model(mcfg.to_args())
    load_meta_weights(model, folder)
    with torch.no_grad():
        diff = (model.eval()(X) - ref(X).logits).abs().max().item()
    print(f"PARITY meta consolidated x2: {diff:.2e}")
    assert diff <= 1e-5


def test_meta_loader_names_the_type_for_a_hugging_face_folder(tmp_path):
    from spindle.checkpoint.meta import read_meta
    from spindle.errors import SpindleError

    reference(2, False).save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(SpindleError, match="not a Meta Llama folder.*use ckpt_type='hf'"):
        read_meta(tmp_path / "hf")


def test_spindle_load_model_reads_an_internevo_folder(tmp_path, internevo_config_class):
    import spindle

    folder, want = make_case(tmp_path, internevo_config_class, "llama2_default", 2, 2)
    model, cfg = spindle.load_model(str(folder))
    assert cfg.model.num_kv_attention_heads == 2 and cfg.data.seq_len == cfg.model.max_position_embeddings
    with torch.no_grad():
        assert (model(X) - want).abs().max().item() <= 1e-5
