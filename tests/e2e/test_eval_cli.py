"""`spindle eval ppl`, `spindle eval passkey` and `spindle generate` end to end on a tiny trained checkpoint
(tests/conftest.py's session-wide `tiny_trained_ckpt`), each through `spindle.cli.main` in this process (the
exit codes and one-line errors of a real process: tests/e2e/test_cli.py)."""

import json
from pathlib import Path

import pytest

from helpers import run_cli as spindle

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(tiny_trained_ckpt):
    return tiny_trained_ckpt


def test_eval_ppl_writes_json_and_png(ckpt):
    tmp, ck = ckpt
    out = tmp / "ppl"
    r = spindle("eval", "ppl", "--ckpt", str(ck), "--data", str(tmp / "text"), "--lengths", "32,64,128",
                "--variants", "plain,dynamic,yarn,logn,ntk:4", "--windows", "2", "--chunk", "48", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "ppl.json").read_text())
    assert res["train_len"] == 32 and res["lengths"] == [32, 64, 128]
    assert set(res["variants"]) == {"plain", "dynamic", "yarn", "logn", "ntk:4"}
    assert res["variants"]["dynamic"]["per_length"] and not res["variants"]["plain"]["per_length"]
    p = res["variants"]["plain"]["length"]
    # up to the training length, dynamic NTK, YaRN (factor 1) and log-n are the plain model
    for v in ("dynamic", "yarn", "logn"):
        assert abs(res["variants"][v]["length"]["32"]["nll"] - p["32"]["nll"]) < 1e-5
    assert (out / "ppl.png").stat().st_size > 10_000
    assert "perplexity over the first L tokens" in r.stdout


def test_eval_ppl_without_out_or_data_prints_the_checkpoints_own_data(ckpt):
    from spindle.eval.perplexity import format_table, run_ppl

    tmp, ck = ckpt
    before = sorted(p.name for p in tmp.iterdir())
    r = spindle("eval", "ppl", "--ckpt", str(ck), "--lengths", "32,64", "--variants", "plain", "--windows", "2")
    assert r.returncode == 0, r.stderr
    assert "no --data, reading 4 files of data.train_folder" in r.stdout and "wrote" not in r.stdout
    want = format_table(run_ppl(str(ck), [str(tmp / "text")], [32, 64], ["plain"], windows=2))
    assert want in r.stdout  # the same numbers as an explicit --data of the training folder
    assert sorted(p.name for p in tmp.iterdir()) == before and not (ROOT / "ppl.json").exists()


def test_eval_out_refuses_a_non_empty_folder_and_leaves_it_as_it_was(ckpt):
    tmp, ck = ckpt
    taken = tmp / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_bytes(b"results I care about\n")
    args = ["eval", "ppl", "--ckpt", str(ck), "--data", str(tmp / "text"), "--lengths", "32", "--variants", "plain",
            "--windows", "1", "--out", str(taken)]
    r = spindle(*args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--overwrite" in r.stderr
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    assert (taken / "notes.txt").read_bytes() == b"results I care about\n"
    r = spindle(*args, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt", "ppl.json", "ppl.png"]
    assert (taken / "notes.txt").read_bytes() == b"results I care about\n"


def test_eval_passkey_grid_holds_the_teacher_forced_scores(ckpt):
    import torch

    from spindle.data.tokenizer import load_tokenizer
    from spindle.eval.load import load_model_for_eval
    from spindle.eval.passkey import make_sample

    tmp, ck = ckpt
    out = tmp / "pk"
    r = spindle("eval", "passkey", "--ckpt", str(ck), "--lengths", "256,512", "--depths", "0,0.5,1",
                "--samples", "1", "--variants", "plain,dynamic", "--mode", "teacher", "--chunk", "100",
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "passkey.json").read_text())
    assert (out / "passkey.png").is_file() and "passkey accuracy (teacher" in r.stdout
    # the plain grid, recomputed by one full forward per sample (no cache, no chunks)
    model, _ = load_model_for_eval(str(ck))
    tok = load_tokenizer("byte")
    for i, L in enumerate([256, 512]):
        for j, d in enumerate([0, 0.5, 1]):
            s = make_sample(tok, L, d, 0, 0)
            with torch.no_grad():
                logits = model(torch.tensor([s["ids"] + s["answer"][:-1]]))[0, -len(s["answer"]):]
            target = torch.tensor(s["answer"])
            assert res["variants"]["plain"]["accuracy"][i][j] == float(bool((logits.argmax(-1) == target).all()))
            logp = float(logits.log_softmax(-1).gather(-1, target[:, None]).mean())
            assert res["variants"]["plain"]["answer_logp"][i][j] == pytest.approx(logp, abs=1e-4)
    # past the training length (32) Dynamic NTK rotates differently: its answer log-probs differ
    assert res["variants"]["dynamic"]["answer_logp"] != res["variants"]["plain"]["answer_logp"]


def test_eval_progress_lines_reach_stdout_as_they_go(ckpt):
    """The lines the eval modules log (spindle.logs): each variant's perplexities and each passkey row, on stdout
    before the table, in the order they were computed."""
    tmp, ck = ckpt
    r = spindle("eval", "ppl", "--ckpt", str(ck), "--data", str(tmp / "text"), "--lengths", "32,64",
                "--variants", "plain,yarn", "--windows", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"eval ppl: {ck}: ") and lines[0].endswith("training length 32, chunk 1024")
    assert lines[1].startswith("  plain: 32: ") and ", 64: " in lines[1] and lines[2].startswith("  yarn: 32: ")
    r = spindle("eval", "passkey", "--ckpt", str(ck), "--lengths", "256", "--depths", "0,1", "--samples", "1",
                "--mode", "teacher", "--chunk", "100")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("  passkey plain L=256: ") and r.stderr == ""


def test_eval_bad_input_is_one_line_exit_2(ckpt):
    tmp, ck = ckpt
    r = spindle("eval", "ppl", "--ckpt", str(ck), "--data", str(tmp / "nope"), "--out", str(tmp / "x"))
    assert r.returncode == 2 and r.stderr.strip().startswith("spindle: error:") and "nope" in r.stderr
    r = spindle("eval", "ppl", "--ckpt", str(ck), "--data", str(tmp / "text"), "--variants", "warp",
                "--out", str(tmp / "x"))
    assert r.returncode == 2 and "warp" in r.stderr
    r = spindle("eval", "passkey", "--ckpt", str(ck), "--depths", "0,2")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--depths" in r.stderr


def library_text(ck, prompt, n, rope_scaling=None, **sampling):
    """What `spindle generate` should print after the prompt: the streamed pieces, as the CLI streams them."""
    from spindle.data.tokenizer import load_tokenizer
    from spindle.eval.generate import complete_text
    from spindle.eval.load import load_model_for_eval

    model, _ = load_model_for_eval(str(ck), rope_scaling=rope_scaling)
    pieces = []
    complete_text(model, load_tokenizer("byte"), prompt, n, stream=pieces.append, **sampling)
    return "".join(pieces)


def test_generate_streams_and_uses_the_sampling_options(ckpt):
    tmp, ck = ckpt
    r = spindle("generate", "--ckpt", str(ck), "--prompt", "def f(", "--max-new-tokens", "24", "--temperature", "1.5",
                "--top-k", "50", "--top-p", "0.95", "--seed", "3")
    assert r.returncode == 0, r.stderr
    sampled = library_text(ck, "def f(", 24, temperature=1.5, top_k=50, top_p=0.95, seed=3)
    greedy = library_text(ck, "def f(", 24)
    assert sampled != greedy  # the options matter for this model and prompt ...
    assert r.stdout == "def f(" + sampled + "\n"  # ... and the command applied them


def test_generate_with_dynamic_ntk(ckpt):
    tmp, ck = ckpt
    prompt = "def f(x):\n    return x + 1\n" * 3  # 78 bytes: past the training length 32
    r = spindle("generate", "--ckpt", str(ck), "--prompt", prompt, "--max-new-tokens", "16",
                "--rope-scaling", "dynamic")
    assert r.returncode == 0, r.stderr
    dynamic, plain = library_text(ck, prompt, 16, "dynamic"), library_text(ck, prompt, 16)
    assert dynamic != plain
    assert r.stdout == prompt + dynamic + "\n"
