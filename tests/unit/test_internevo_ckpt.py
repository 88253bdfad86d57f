"""InternEvo checkpoint folders: shards cut exactly as InternEvo saves them (tests/internevo_folders.py),
read back by Spindle.

tests/internevo_folders.py starts from a random transformers Llama (the reference logits), re-lays its weights out
in InternEvo's names and layouts for each model_type (fused Wqkv / grouped wqkv, w2/w3 roles,
interleaved q/k rows when adapt_hf=False), cuts them into tp x pp shards the way InternEvo's ranks
hold them (column-parallel rows, row-parallel columns, stage-local layer indices under `model.`),
and writes model_config.pt as a pickled InternEvo Config, context.pt, schedulder.pt, sampler.pt, an
optimizer file and the {step}.step marker. Nothing of InternEvo is imported or run.
"""

from __future__ import annotations

import json
import types

import pytest
import torch

from spindle.checkpoint.loading import is_internevo_folder
from spindle.interop.internevo import load_internevo_weights, read_internevo
from spindle.checkpoint.loading import load_checkpoint
from spindle.cli import main
from spindle.config import ModelConfig, validate_config
from spindle.model.llama import build_model

transformers = pytest.importorskip("transformers")

from internevo_folders import (CASES, HD, HEADS, LAYERS, VOCAB, H, X, internevo_config_class  # noqa: E402
                               as config_class, make_case, reference, to_interleaved)


@pytest.fixture
def internevo_config_class():
    with config_class() as config:
        yield config


LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 3)]


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
    from spindle.interop.meta import load_meta_weights, read_meta

    ref = reference(2, False, ffn=176)  # Meta's rule: int(2 * 4 * 64 / 3) = 170 -> multiple_of 16 -> 176
    sd = ref.state_dict()
    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"], "rope.freqs": torch.zeros(HD // 2)}
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
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
    from spindle.interop.meta import read_meta
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


# --------------------------------------------------------------------------- load_ckpt_info(ckpt_type="internevo")


def internevo_start_config(tmp_path, folder, content, path=None, raw=False):
    from spindle.interop.internevo import read_internevo

    model = dict(read_internevo(folder).model, dtype="torch.float32")
    return (dict if raw else validate_config)({
        "model": model, "data": {"seq_len": 16, "micro_bsz": 1, "total_steps": 50},
        "trainer": {"run_folder": str(tmp_path / "runs"), "tensorboard": False, "progress_bar": False},
        "ckpt": {"load_ckpt_info": {"path": str(path or folder), "content": content, "ckpt_type": "internevo"}},
    })


@pytest.mark.parametrize("case, tp, pp", [("internlm_v1", 2, 1), ("internlm2_not_adapt_hf", 1, 2),
                                          ("llama2_default", 2, 3)])
def test_load_ckpt_info_trains_from_an_internevo_folder(tmp_path, internevo_config_class, case, tp, pp, spindle_lines):
    """The README's compatibility line as written: load_ckpt_info(path=<llm_ckpts/41>, ckpt_type="internevo")
    starts training with the weights `convert from-internevo` gives, the counters, and says what it left."""
    from spindle.parallel.mesh import ParallelEnv
    from spindle.train.trainer import Trainer

    folder, want = make_case(tmp_path, internevo_config_class, case, tp, pp)
    lines = spindle_lines
    trainer = Trainer(internevo_start_config(tmp_path, folder, ("all",)), ParallelEnv())
    with torch.no_grad():
        assert (trainer.raw_model.eval()(X) - want).abs().max().item() <= 1e-5
    assert (trainer.state.step, trainer.state.updates, trainer.state.num_consumed_tokens) == (42, 41, 123456)
    said = "\n".join(lines)
    assert f"InternEvo checkpoint {folder}: loading weights, the step and token counters, the schedule position" \
        in said and "AdamW moments are not mapped" in said and f"tp={tp} x pp={pp}" in said


def test_weights_only_from_an_internevo_folder_keep_the_counters_at_zero(tmp_path, internevo_config_class):
    from spindle.parallel.mesh import ParallelEnv
    from spindle.train.trainer import Trainer

    folder, _ = make_case(tmp_path, internevo_config_class, "internlm_v1", 1, 1)
    trainer = Trainer(internevo_start_config(tmp_path, folder, ("model",)), ParallelEnv())
    assert (trainer.state.step, trainer.state.updates) == (0, 0)


def test_a_converted_checkpoint_asked_for_all_says_it_has_no_optimizer_state(tmp_path, internevo_config_class,
                                                                             capsys):
    folder, _ = make_case(tmp_path, internevo_config_class, "internlm_v1", 1, 1)
    assert main(["convert", "from-internevo", str(folder), str(tmp_path / "converted")]) == 0
    raw = internevo_start_config(tmp_path, folder, ("all",), path=tmp_path / "converted", raw=True)
    config = tmp_path / "start.py"
    config.write_text("".join(f"{k} = {v!r}\n" for k, v in raw.items()))
    capsys.readouterr()
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no optimizer state" in err and "content=('model', 'scheduler', 'sampler')" in err and \
        "\n" not in err, err
