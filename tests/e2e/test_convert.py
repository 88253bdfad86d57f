"""Hugging Face interop: `spindle convert to-hf` loads in transformers' LlamaForCausalLM with the same
logits; `spindle convert from-hf` and ckpt_type="hf" start training from a HF Llama folder."""

import json

import pytest
import torch

from spindle.checkpoint.discovery import resolve
from spindle.checkpoint.loading import load_checkpoint
from spindle.cli import main
from spindle.config import validate_config
from spindle.model.llama import build_model
from spindle.parallel.mesh import ParallelEnv
from spindle.train.trainer import Trainer

transformers = pytest.importorskip("transformers")



def cfg_for(tmp_path, model=None, ckpt=None, data=None):
    raw = {
        "JOB_NAME": "hf",
        "data": {"seq_len": 16, "micro_bsz": 2, "micro_num": 1, "total_steps": 2, "tokenizer_path": "default",
                 **(data or {})},
        "model": {"hidden_size": 32, "num_attention_heads": 4, "num_kv_attention_heads": 2, "num_layers": 2,
                  "vocab_size": 96, "multiple_of": 16, "max_position_embeddings": 64, "rope_base": 50000.0,
                  "layer_norm_epsilon": 1e-6, **(model or {})},
        "adam": {"lr": 1e-2},
        "trainer": {"run_folder": str(tmp_path), "tensorboard": False, "progress_bar": False, "seed": 3,
                    "num_threads": 1},
        "ckpt": {"enable_save_ckpt": True, **(ckpt or {})},
    }
    return validate_config(raw)


def hf_logits(folder, ids):
    model = transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(ids).logits


SCALINGS = {
    "plain": None,
    "dynamic": {"use_dynamic_ntk_rope": True},
    "linear": {"rope_scaling": {"type": "linear", "factor": 2.0}},
    "yarn": {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}},
    "llama3": {"rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 32}},
}


@pytest.mark.parametrize("variant", list(SCALINGS))
def test_to_hf_same_logits(tmp_path, variant):
    dynamic = variant == "dynamic"
    cfg = cfg_for(tmp_path, model=SCALINGS[variant])
    tr = Trainer(cfg, ParallelEnv())
    tr.fit()
    out = tmp_path / "hf_out"
    assert main(["convert", "to-hf", str(tr.save_dir), str(out)]) == 0
    conf = json.loads((out / "config.json").read_text())
    assert conf["rope_theta"] == 50000.0 and conf["rope_parameters"]["rope_theta"] == 50000.0
    hf_cfg = transformers.AutoConfig.from_pretrained(str(out))
    params = (getattr(hf_cfg, "rope_parameters", None)
              or {"rope_theta": hf_cfg.rope_theta, **(hf_cfg.rope_scaling or {})})
    assert params["rope_theta"] == 50000.0
    if dynamic:
        assert params["rope_type"] == "dynamic" and params["factor"] == 1.0
    assert (out / "model.safetensors").is_file()
    assert not (out / "tokenizer.model").exists()  # 1024 ids of the default tokenizer do not fit vocab 96
    # 80 > max_position_embeddings (64): with dynamic NTK the base is rescaled, in both implementations
    ids = torch.randint(0, 96, (2, 80 if dynamic else 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = tr.raw_model.eval()(ids)
    diff = (hf_logits(out, ids) - ours).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("scaling", [{"type": "linear", "factor": 2.0},
                                     {"type": "llama3", "factor": 4.0, "original_max_position_embeddings": 16},
                                     {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}])
def test_rope_scaling_carried_into_hf_config(scaling):
    from spindle.interop.families import hf_config, model_config_from_hf
    from spindle.config import ModelConfig

    m = ModelConfig(hidden_size=32, num_attention_heads=4, num_layers=1, vocab_size=96, rope_base=5e5,
                    max_position_embeddings=64, rope_scaling=scaling)
    conf = hf_config(m.to_args())
    assert conf["rope_theta"] == 5e5 and conf["rope_scaling"]["rope_type"] == scaling["type"]
    hf = transformers.LlamaConfig(**{k: v for k, v in conf.items() if k not in ("architectures", "model_type")})
    params = getattr(hf, "rope_parameters", None) or hf.rope_scaling
    assert params["rope_type"] == scaling["type"] and params["factor"] == scaling["factor"]
    assert params.get("rope_theta", getattr(hf, "rope_theta", None)) == 5e5
    back = model_config_from_hf(conf)
    assert back["rope_base"] == 5e5 and back["rope_scaling"]["type"] == scaling["type"]
    assert back["rope_scaling"]["factor"] == scaling["factor"]


def test_round_trip_from_hf_and_ckpt_type_hf(tmp_path):
    hf_cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-6, rope_theta=20000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    src = tmp_path / "src"
    hf.save_pretrained(str(src))
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits

    # spindle convert from-hf -> a Spindle checkpoint with the same logits
    out = tmp_path / "imported"
    assert main(["convert", "from-hf", str(src), str(out)]) == 0
    storage, ref = resolve(str(out))
    path = out / ref.rel
    mcfg = validate_config(json.loads((path / "config.json").read_text())).model
    assert mcfg.ffn_hidden_size == 80 and mcfg.rope_base == 20000.0
    model = build_model(mcfg.to_args())
    load_checkpoint(path, model, None, ("model",))
    with torch.no_grad():
        assert (model.eval()(ids) - want).abs().max().item() <= 1e-4

    # and back: to-hf of the imported checkpoint reproduces the HF logits
    back = tmp_path / "back"
    assert main(["convert", "to-hf", str(out), str(back)]) == 2  # the folder had no tokenizer: none is invented
    assert main(["convert", "to-hf", str(out), str(back), "--tokenizer", "none"]) == 0
    assert (hf_logits(back, ids) - want).abs().max().item() <= 1e-4

    # training starts from the HF folder directly (ckpt_type="hf") or from the converted checkpoint
    model_over = {"hidden_size": 32, "num_attention_heads": 4, "num_kv_attention_heads": 2, "num_layers": 2,
                  "vocab_size": 96, "mlp_ratio": 2.5, "multiple_of": 16, "max_position_embeddings": 64,
                  "rope_base": 20000.0, "layer_norm_epsilon": 1e-6}
    for info in ({"path": str(src), "ckpt_type": "hf"}, {"path": str(out), "content": "model"}):
        cfg = cfg_for(tmp_path / info.get("ckpt_type", "dcp"), model=model_over, ckpt={"load_ckpt_info": info},
                      data={"tokenizer_path": None})
        tr = Trainer(cfg, ParallelEnv())
        with torch.no_grad():
            assert (tr.raw_model.eval()(ids) - want).abs().max().item() <= 1e-4
        assert len(tr.fit()["history"]) == 2

    # a config that disagrees with the HF folder: an error naming both keys and values (issue 24: it named a
    # tensor shape before)
    bad = cfg_for(tmp_path / "bad", model=dict(model_over, vocab_size=128),
                  ckpt={"load_ckpt_info": {"path": str(src), "ckpt_type": "hf"}}, data={"tokenizer_path": None})
    with pytest.raises(Exception, match=r"model.vocab_size gives vocab_size=128 but .*config.json vocab_size gives 96"):
        Trainer(bad, ParallelEnv())


def test_convert_bad_input_exit_code_2(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    assert main(["convert", "to-hf", str(tmp_path / "junk"), str(tmp_path / "o")]) == 2
    assert "not a Spindle checkpoint" in capsys.readouterr().err
    assert main(["convert", "from-hf", str(tmp_path / "junk"), str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err


# --------------------------------------------------------------------------- exported folders are complete


def save_spindle_checkpoint(folder, model_section, data_section, seed=0):
    """A Spindle checkpoint as a run writes it (model weights + the run's config), without training."""
    from spindle.checkpoint.manager import CheckpointManager
    from spindle.config import CkptConfig

    cfg = validate_config({"model": model_section, "data": data_section})
    model = build_model(cfg.model.to_args(), seed=seed)
    with torch.no_grad():  # far from init, so a wrong mapping would show in the generated tokens
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    CheckpointManager(str(folder), CkptConfig()).save(1, model, None, {"step": 1}, cfg.to_dict())
    return model


def greedy(model, prompt_ids, n):
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model.eval()(torch.tensor([ids]))[0, -1].argmax()))
    return ids


def test_to_hf_writes_the_data_tools_default_tokenizer_and_generates(tmp_path):
    """A checkpoint that records no tokenizer (data.tokenizer_path None, as after InternEvo's own tools) exports
    the packaged one when `--tokenizer default` names it (never unasked: tests/e2e/test_tokenizer_identity.py),
    and transformers tokenizes and generates from the folder alone."""
    from spindle.data.tokenizer import load_tokenizer

    section = {"hidden_size": 32, "num_attention_heads": 4, "num_layers": 2, "vocab_size": 1024, "multiple_of": 16,
               "max_position_embeddings": 64}
    model = save_spindle_checkpoint(tmp_path / "ck", section, {"tokenizer_path": None})
    out = tmp_path / "hf"
    assert main(["convert", "to-hf", str(tmp_path / "ck"), str(out), "--tokenizer", "default"]) == 0
    ours = load_tokenizer("default")
    conf = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert (conf["bos_token_id"], conf["eos_token_id"]) == (ours.bos_id, ours.eos_id) == (gen["bos_token_id"],
                                                                                          gen["eos_token_id"])
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    # (transformers rebuilds the sentencepiece BPE; only text *starting* with 2+ spaces encodes differently)
    for text in ("Hello world, 123", "two  spaces\n  indented\nand a new line", "ünïcödé"):
        assert tok(text).input_ids == [ours.bos_id] + ours.encode(text), text
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    prompt = tok("Hello world", return_tensors="pt")
    with torch.no_grad():
        out_ids = hf.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert out_ids[0].tolist() == greedy(model, prompt.input_ids[0].tolist(), 6)


def test_to_hf_writes_the_byte_tokenizer_and_generates(tmp_path):
    """The demo's byte tokenizer leaves as a byte-level tokenizer.json: transformers gives Spindle's ids
    (BOS, then the UTF-8 bytes) and decodes them back, and generates what Spindle generates."""
    section = {"hidden_size": 32, "num_attention_heads": 4, "num_layers": 2, "vocab_size": 258, "multiple_of": 16,
               "max_position_embeddings": 64}
    model = save_spindle_checkpoint(tmp_path / "ck", section, {"tokenizer_path": "byte"})
    out = tmp_path / "hf"
    assert main(["convert", "to-hf", str(tmp_path / "ck"), str(out)]) == 0
    conf = json.loads((out / "config.json").read_text())
    assert (conf["bos_token_id"], conf["eos_token_id"]) == (256, 257)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in ("import os\n", "  two  spaces\tand a tab", "ünïcödé → ✓"):
        ids = tok(text).input_ids
        assert ids == [256] + list(text.encode("utf-8")), text
        assert tok.decode(ids, skip_special_tokens=True) == text
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    prompt = tok("def f(", return_tensors="pt")
    with torch.no_grad():
        out_ids = hf.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert out_ids[0].tolist() == greedy(model, prompt.input_ids[0].tolist(), 6)


def write_hf_tokenizer_folder(folder):
    """A BPE tokenizer.json trained here, with the config files an HF folder carries."""
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    tk = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300,
                                  special_tokens=["<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["hello world, this is a tiny corpus for a tiny tokenizer"] * 20, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
         "pad_token": "<|endoftext|>", "unk_token": "<unk>", "chat_template": template, "model_max_length": 512},
        indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    return tk.get_vocab_size()


def test_hf_tokenizer_files_travel_unchanged_through_import_and_export(tmp_path):
    src = tmp_path / "src"
    vocab = write_hf_tokenizer_folder(src)
    cfg = transformers.Qwen2Config(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(str(src))
    assert vocab <= 320
    assert main(["convert", "from-hf", str(src), str(tmp_path / "ck")]) == 0
    assert main(["convert", "to-hf", str(tmp_path / "ck"), str(tmp_path / "back")]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "back" / name).read_bytes() == (src / name).read_bytes(), name
    a, b = (transformers.AutoTokenizer.from_pretrained(str(p)) for p in (src, tmp_path / "back"))
    chat = [{"role": "user", "content": "hello tiny world"}]
    assert (a.apply_chat_template(chat, add_generation_prompt=True)
            == b.apply_chat_template(chat, add_generation_prompt=True))
    assert a("this is a tiny corpus").input_ids == b("this is a tiny corpus").input_ids
    conf = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (conf["architectures"] == ["Qwen2ForCausalLM"]
            and conf["eos_token_id"] == a.convert_tokens_to_ids("<|im_end|>"))


# --------------------------------------------------------------------------- safety and bad input


def tree_bytes(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


SMALL = {"hidden_size": 32, "num_attention_heads": 4, "num_layers": 1, "vocab_size": 96, "multiple_of": 16,
         "max_position_embeddings": 64}


@pytest.mark.parametrize("target", ["{ck}/1", "{ck}", "{ck}/1/inner", "{parent}"])
def test_convert_never_writes_into_or_around_its_source(tmp_path, capsys, target):
    ck = tmp_path / "run" / "ck"
    save_spindle_checkpoint(ck, SMALL, {"tokenizer_path": "byte"})
    before = tree_bytes(tmp_path)
    out = target.format(ck=ck, parent=tmp_path / "run")
    for flags in ([], ["--overwrite"]):
        assert main(["convert", "to-hf", f"{ck}/1", out, *flags]) == 2
        err = capsys.readouterr().err
        assert any(w in err for w in ("is the input", "is inside the input folder", "holds the input")), err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert tree_bytes(tmp_path) == before


def test_existing_target_needs_overwrite_which_keeps_unrelated_files(tmp_path, capsys):
    ck = tmp_path / "ck"
    save_spindle_checkpoint(ck, SMALL, {"tokenizer_path": "byte"})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert main(["convert", "to-hf", str(ck), str(out)]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"
    assert main(["convert", "to-hf", str(ck), str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "keep.txt").read_text() == "user data"  # issue 22
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder or lock left
    (tmp_path / "empty").mkdir()
    assert main(["convert", "to-hf", str(ck), str(tmp_path / "empty")]) == 0  # an empty folder is fine


def corrupt(path, how):
    if how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(how)


@pytest.mark.parametrize("damage, message", [
    (lambda d: corrupt(d / "config.json", b"{not json"), "config.json: not valid JSON"),
    (lambda d: corrupt(d / "config.json", b"[1, 2]"), "expected a JSON object"),
    (lambda d: corrupt(d / "model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{bad header json}"),
     "model.safetensors: not a readable safetensors file"),
    (lambda d: corrupt(d / "model.safetensors", "truncate"), "model.safetensors: not a readable safetensors file"),
    (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors(.index.json) or pytorch_model.bin"),
    (lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": {"x": "../../etc/passwd"}}'),
     "expected a file name in this folder"),
    (lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": {"x": "other.safetensors"}}'),
     "weight_map names other.safetensors, which is not in"),
    (lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": []}'), "weight_map must be"),
    (lambda d: (d / "model.safetensors.index.json").write_text(
        '{"weight_map": {"model.norm.weight": "model.safetensors", "ghost": "model.safetensors"}}'),
     "has no tensor ghost, which the weight index places in it"),
])
def test_from_hf_bad_files_are_one_line(tmp_path, capsys, damage, message):
    hf_cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    src = tmp_path / "src"
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(str(src))
    capsys.readouterr()  # transformers' progress bar
    damage(src)
    assert main(["convert", "from-hf", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_from_hf_shape_mismatch_names_the_tensor(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    hf_cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    src = tmp_path / "src"
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(str(src))
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(80, 32)
    save_file(tensors, str(src / "model.safetensors"))
    assert main(["convert", "from-hf", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "layers.0.feed_forward.w3.weight (model.layers.0.mlp.up_proj.weight) has shape [80, 32]" in err


@pytest.mark.parametrize("argv, message", [
    (["to-hf"], "the following arguments are required: ckpt, out"),
    (["to-hf", "a", "b", "--bogus"], "unrecognized arguments: --bogus"),
    (["sideways", "a", "b"], "invalid choice: 'sideways'"),
    (["to-hf", "a", "boto3:s3://bucket/x"], "conversions write to a local folder"),
])
def test_convert_bad_options_are_one_line(tmp_path, capsys, argv, message):
    assert main(["convert", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_to_hf_bad_checkpoint_config_is_one_line(tmp_path, capsys):
    ck = tmp_path / "ck"
    save_spindle_checkpoint(ck, SMALL, {"tokenizer_path": "byte"})
    (ck / "1" / "config.json").write_text("{truncated")
    assert main(["convert", "to-hf", str(ck), str(tmp_path / "out")]) == 2
    assert "config.json: 10 bytes, the completion record says" in capsys.readouterr().err  # verified first
    (ck / "1.step").write_text("1\n")  # a first-wave record (no sizes): the config itself is checked
    (ck / "1" / "config.json").write_text(json.dumps({"model": {"hidden_size": "wide"}}))
    assert main(["convert", "to-hf", str(ck), str(tmp_path / "out")]) == 2
    assert "model.hidden_size" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_spindle_load_model_reads_spindle_and_hugging_face_folders(tmp_path):
    import spindle

    ck = tmp_path / "ck"
    ours = save_spindle_checkpoint(ck, SMALL, {"tokenizer_path": "byte"})
    ids = torch.randint(0, 96, (1, 12))
    model, cfg = spindle.load_model(str(ck))
    with torch.no_grad():
        assert torch.equal(model(ids), ours.eval()(ids)) and cfg.data.tokenizer_path == "byte"
    hf_cfg = transformers.Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=12)
    hf = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    model, cfg = spindle.load_model(f"local:{tmp_path / 'hf'}")
    assert cfg.model.qk_norm and cfg.model.head_dim == 12 and not model.training
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-5
