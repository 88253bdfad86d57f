"""Long-context evaluation: per-position loss via chunked prefill, buckets, variants, passkey samples."""

import math

import pytest
import torch
import torch.nn.functional as F

from spindle.config import ModelConfig
from spindle.data.tokenizer import load_tokenizer
from spindle.errors import SpindleError
from spindle.eval.passkey import make_sample, score_sample
from spindle.eval.perplexity import (bucket_edges, bucket_means, evaluate_variant, make_windows, parse_variant,
                                     set_rope, token_losses)
from spindle.model.llama import build_model


def tiny(**kw):
    base = dict(hidden_size=32, num_attention_heads=2, num_kv_attention_heads=1, num_layers=2, vocab_size=258,
                mlp_ratio=2, multiple_of=16, max_position_embeddings=16)
    return build_model(ModelConfig(**{**base, **kw}).to_args(), seed=3).eval()


def full_forward_losses(model, ids, seq_len=None):
    with torch.no_grad():
        pos = torch.arange(ids.shape[1] - 1).expand(ids.shape[0], -1)
        logits = model(ids[:, :-1], pos, seq_len=seq_len).float()
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none"), logits.argmax(-1) == ids[:, 1:]


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
def test_per_position_loss_equals_full_forward(chunk):
    torch.manual_seed(0)
    model = tiny()
    ids = torch.randint(0, 258, (2, 50))
    nll, correct = token_losses(model, ids, chunk=chunk)
    ref, ref_correct = full_forward_losses(model, ids)
    assert nll.shape == (2, 49)
    assert torch.allclose(nll, ref, atol=1e-4)
    assert torch.equal(correct, ref_correct)


DYNAMIC = {"type": "dynamic", "factor": 1.0}


@pytest.mark.parametrize("scaling, logn", [(None, 16), (DYNAMIC, None), (DYNAMIC, 16)])
def test_chunked_prefill_matches_full_forward_for_logn_and_dynamic(scaling, logn):
    torch.manual_seed(1)
    model = set_rope(tiny(), scaling, logn)
    ids = torch.randint(0, 258, (1, 70))  # well past max_position_embeddings = 16
    nll, _ = token_losses(model, ids, chunk=9)  # seq_len = 70 for every chunk
    ref, _ = full_forward_losses(model, ids, seq_len=70)
    assert torch.allclose(nll, ref, atol=1e-4)


def test_dynamic_variant_is_evaluated_once_per_length_with_that_length():
    torch.manual_seed(2)
    model = tiny()
    wins = torch.randint(0, 258, (2, 64))
    v = parse_variant("dynamic", 16)
    assert v.per_length and v.scaling["type"] == "dynamic"
    res = evaluate_variant(model, wins, [16, 32, 64], 16, v, chunk=8)
    for L in (16, 32, 64):
        want = set_rope(tiny(), DYNAMIC, None)
        ref, _ = full_forward_losses(want, wins[:, :L], seq_len=L)
        assert math.isclose(res["length"][str(L)]["nll"], float(ref.double().mean()), rel_tol=1e-5)
        assert math.isclose(res["length"][str(L)]["tail_nll"], float(ref[:, L // 2 - 1:].double().mean()),
                            rel_tol=1e-5)
    # the swapped rotary module is restored afterwards
    assert model.rotary.rope_type == "default"


def test_fixed_variant_truncated_ppl_comes_from_one_pass():
    torch.manual_seed(3)
    model = tiny()
    wins = torch.randint(0, 258, (3, 48))
    res = evaluate_variant(model, wins, [16, 48], 16, parse_variant("plain", 16), chunk=5)
    ref, _ = full_forward_losses(model, wins[:, :16])
    assert math.isclose(res["length"]["16"]["nll"], float(ref.double().mean()), rel_tol=1e-5)
    assert math.isclose(res["length"]["16"]["ppl"], math.exp(res["length"]["16"]["nll"]))
    assert res["curve"]["edges"][0] == 0 and res["curve"]["edges"][-1] == 47


def test_logn_and_yarn_variants_change_only_past_the_training_length():
    torch.manual_seed(4)
    model = tiny()
    wins = torch.randint(0, 258, (1, 40))
    plain = evaluate_variant(model, wins, [40], 16, parse_variant("plain", 16), chunk=8)
    logn = evaluate_variant(model, wins, [40], 16, parse_variant("logn", 16), chunk=8)
    # log-n is the identity for positions < 16: the first curve buckets agree, later ones differ
    e = plain["curve"]["edges"]
    inside = [i for i in range(len(e) - 1) if e[i + 1] <= 16]
    assert all(abs(plain["curve"]["nll"][i] - logn["curve"]["nll"][i]) < 1e-6 for i in inside)
    assert abs(plain["length"]["40"]["tail_nll"] - logn["length"]["40"]["tail_nll"]) > 1e-6
    y = parse_variant("yarn", 16)
    assert y.per_length_yarn and y.per_length
    assert parse_variant("yarn:4", 16).scaling == {"type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 16}
    assert parse_variant("dynamic+logn", 16).logn
    with pytest.raises(SpindleError):
        parse_variant("warp:2", 16)


def test_buckets_and_windows():
    edges = bucket_edges(1024, 256, per_octave=1, start=64)
    assert edges == [0, 64, 128, 256, 512, 1024]
    vals = torch.arange(8.0)[None].repeat(2, 1)
    assert bucket_means(vals, [0, 2, 8]) == [0.5, 4.5]
    docs = [list(range(10)), list(range(3)), list(range(100, 104)), list(range(5))]
    wins, natural = make_windows(docs, 6, 3)
    assert natural == 1 and wins.shape == (3, 6)
    assert wins[0].tolist() == list(range(6))
    assert wins[1].tolist() == [0, 1, 2, 100, 101, 102]


def test_passkey_sample_is_seeded_and_puts_the_key_at_the_depth():
    tok = load_tokenizer("byte")
    a = make_sample(tok, 1000, 0.5, seed=1, index=0)
    b = make_sample(tok, 1000, 0.5, seed=1, index=0)
    c = make_sample(tok, 1000, 0.5, seed=2, index=0)
    assert a == b and a["key"] != c["key"]
    assert a["length"] == 1000
    text = tok.decode(a["ids"])
    assert f"The pass key is {a['key']}." in text and text.endswith("What is the pass key? The pass key is")
    for depth in (0.0, 0.25, 0.75, 1.0):
        s = make_sample(tok, 2000, depth, seed=5)
        key_text = tok.encode(f"The pass key is {s['key']}.")
        assert s["ids"][s["key_start"]: s["key_start"] + len(key_text)] == key_text
        # the key sits at `depth` of the filler between the instruction and the question
        head = len(tok.encode("There is an important info hidden inside a lot of irrelevant text. Find it and "
                              "memorize them. I will quiz you about the important information there.\n")) + 1
        budget = 2000 - head - len(tok.encode(f"The pass key is {s['key']}. Remember it. {s['key']} is the pass key. "))
        budget -= len(tok.encode("\nWhat is the pass key? The pass key is"))
        assert s["key_start"] == head + round(depth * budget)
    with pytest.raises(SpindleError):
        make_sample(tok, 50, 0.5)


def test_passkey_scoring_runs_both_modes():
    tok = load_tokenizer("byte")
    model = tiny()
    s = make_sample(tok, 300, 0.3, seed=0)
    g = score_sample(model, tok, s, "generate", chunk=64)
    t = score_sample(model, tok, s, "teacher", chunk=64)
    assert isinstance(g["correct"], bool) and isinstance(g["output"], str)
    assert isinstance(t["correct"], bool) and t["logp"] < 0
    # teacher-forced answer log-prob equals the full-forward one
    ids = torch.tensor([s["ids"] + s["answer"]])
    ref, _ = full_forward_losses(model, ids)
    assert math.isclose(-t["logp"], float(ref[0, -len(s["answer"]):].mean()), rel_tol=1e-4)


def test_continued_training_config_loads_weights_only_at_a_new_base(tmp_path):
    """configs/continue_rope.py's mechanism: load_ckpt_info(content=("model",)) + a new rope_base."""
    from pathlib import Path

    from spindle.config import load_config, validate_config
    from spindle.parallel.mesh import ParallelEnv
    from spindle.train.trainer import Trainer

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "continue_rope.py")
    assert cfg.ckpt.load_ckpt_info.content == ("model",) and cfg.model.rope_base == 1_000_000

    def raw(name, base, **ckpt):
        return {"JOB_NAME": name, "ckpt": {"enable_save_ckpt": True, "auto_resume": False, **ckpt},
                "data": {"seq_len": 16, "micro_bsz": 2, "total_steps": 2},
                "model": {"hidden_size": 32, "num_attention_heads": 2, "num_layers": 1, "vocab_size": 64,
                          "multiple_of": 16, "max_position_embeddings": 16, "rope_base": base},
                "trainer": {"run_folder": str(tmp_path), "tensorboard": False, "progress_bar": False}}

    pre = Trainer(validate_config(raw("pre", 1e4)), ParallelEnv())
    pre.fit()
    saved = {k: v.clone() for k, v in pre.raw_model.state_dict().items()}
    ct = Trainer(validate_config(raw("ct", 1e6, load_ckpt_info={"path": str(pre.save_dir / "2"),
                                                                 "content": ["model"]})), ParallelEnv())
    assert ct.state.step == 0  # fresh schedule and data position
    assert all(torch.equal(saved[k], v) for k, v in ct.raw_model.state_dict().items())
    assert ct.raw_model.rotary.base == 1e6


# ----------------------------------------------------------------------------------- the eval command's options

BAD_OPTIONS = [
    (["ppl", "--lengths", "0"], "--lengths"),
    (["ppl", "--lengths", "1024,abc"], "--lengths"),
    (["ppl", "--lengths", "1e12"], "--lengths"),
    (["ppl", "--lengths", "100.5"], "--lengths"),
    (["ppl", "--windows", "0"], "--windows"),
    (["ppl", "--batch", "-1"], "--batch"),
    (["ppl", "--chunk", "0"], "--chunk"),
    (["ppl", "--train-len", "x"], "--train-len"),
    (["ppl", "--threads", "0"], "--threads"),
    (["ppl", "--variants", "warp"], "warp"),
    (["ppl", "--variants", ","], "--variants"),
    (["ppl", "--device", "tpu"], "--device"),
    (["ppl", "--glob", ""], "--glob"),
    (["passkey", "--depths", "0,1.5"], "--depths"),
    (["passkey", "--depths", "nan"], "--depths"),
    (["passkey", "--depths", ""], "--depths"),
    (["passkey", "--samples", "0"], "--samples"),
    (["passkey", "--mode", "guess"], "--mode"),
    (["passkey", "--seed", "x"], "--seed"),
    (["passkey", "--lengths", "-5"], "--lengths"),
]


@pytest.mark.parametrize("argv,option", BAD_OPTIONS)
def test_every_eval_option_is_checked_before_a_model_loads(argv, option):
    from spindle.cli.eval import main as eval_main

    with pytest.raises(SpindleError, match=option) as err:
        eval_main([argv[0], "--ckpt", "/nonexistent/ckpt", *argv[1:]])
    assert "\n" not in str(err.value) and "nonexistent" not in str(err.value)


@pytest.mark.parametrize("options,option", [((0, 0.0, 0, 1.0), "--max-new-tokens"),
                                            ((10**9, 0.0, 0, 1.0), "--max-new-tokens"),
                                            ((8, -1.0, 0, 1.0), "--temperature"),
                                            ((8, float("nan"), 0, 1.0), "--temperature"),
                                            ((8, 1.0, -3, 1.0), "--top-k"),
                                            ((8, 1.0, 0, 0.0), "--top-p"), ((8, 1.0, 0, 1.5), "--top-p")])
def test_generate_options_are_validated(options, option):
    from spindle.eval.generate import validate_generate_options

    validate_generate_options(8, 0.8, 5, 0.9)
    with pytest.raises(SpindleError, match=option):
        validate_generate_options(*options)


def test_a_cache_larger_than_the_machine_is_refused_before_allocating():
    from spindle.eval.prefill import check_cache_memory

    model = tiny()
    check_cache_memory(model, 1 << 20)  # 4 MiB of cache: fine
    with pytest.raises(SpindleError, match=r"--lengths 1,000,000,000,000: the KV cache alone needs [0-9.,]+ TiB "
                                           r"\(1 x [0-9,]+ bytes per token\) but"):
        check_cache_memory(model, 10**12)


def test_loading_documents_stops_once_the_windows_can_be_filled(tmp_path):
    from spindle.eval.perplexity import READ_AHEAD, load_token_docs

    tok = load_tokenizer("byte")
    for i, n in enumerate([5, 50, 8, 60, 70, 3, 3]):
        (tmp_path / f"d{i}.txt").write_text("a" * n)
    assert len(load_token_docs([str(tmp_path)], tok)) == 7
    docs = load_token_docs([str(tmp_path)], tok, enough=(2, 40))  # two documents of >= 40 tokens
    assert [len(d) for d in docs] == [6, 51, 9, 61]
    # no document of 100: the short ones could fill a window after 6 + 51 tokens, but reading goes on
    # to READ_AHEAD x 100 tokens (here: all) looking for a whole one
    assert READ_AHEAD * 100 > 6 + 51 + 9 + 61 + 71 + 4 + 4
    assert len(load_token_docs([str(tmp_path)], tok, enough=(1, 100))) == 7
    assert len(load_token_docs([str(tmp_path)], tok, enough=(1, 15))) == 2  # d1 is long enough


def test_passkey_table_lists_every_cell():
    from spindle.eval.passkey import format_passkey_table

    res = {"mode": "teacher", "samples": 2, "lengths": [256, 512], "depths": [0, 0.5, 1],
           "variants": {"plain": {"mean": 0.5, "accuracy": [[1.0, 0.5, 0.0], [0.5, 0.5, 0.5]]}}}
    text = format_passkey_table(res)
    assert "plain (mean 0.50)" in text
    assert text.splitlines()[-2].split() == ["256", "1.00", "0.50", "0.00"]
