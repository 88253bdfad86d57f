"""Long-context metrics while training, end to end: `spindle train` with `long_eval` keys logs val/ppl@L and
val/passkey@L to the console, metrics.jsonl and TensorBoard; the numbers are `spindle eval ppl`'s on the
saved checkpoint; `spindle eval plot RUN` draws them. Each command through `spindle.cli.main` in this process."""

import json
import math

import pytest

from helpers import run_cli as spindle  # `spindle ...` through spindle.cli.main, in this process

CONFIG = """
JOB_NAME = "toy"
data = dict(type="text", train_folder={text!r}, text_glob="*.txt", tokenizer_path="byte", seq_len=32,
            micro_bsz=2, total_steps=4, valid_every=2)
model = dict(hidden_size=32, num_attention_heads=2, num_kv_attention_heads=2, num_layers=2, vocab_size=258,
             multiple_of=16, max_position_embeddings=32, init_std=0.5)
ckpt = dict(enable_save_ckpt=True, auto_resume=False)
long_eval = dict(lengths=[32, 128], variants=["plain", "yarn"], windows=2, chunk=48,
                 passkey_lengths=[256], passkey_depths=[0, 1], passkey_samples=2)
trainer = dict(run_folder={runs!r}, tensorboard=True, progress_bar=False, num_threads=1)
"""
KEYS = {"val/ppl@32", "val/ppl@128", "val/ppl@32/yarn", "val/ppl@128/yarn", "val/passkey@256",
        "val/passkey@256/yarn"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("longeval")
    (tmp / "text").mkdir()
    for i in range(4):
        (tmp / "text" / f"doc{i}.txt").write_text(f"def f(x):\n    return x + {i}\n" * (60 + 10 * i))
    (tmp / "toy.py").write_text(CONFIG.format(text=str(tmp / "text"), runs=str(tmp / "runs")))
    r = spindle("train", "--config", str(tmp / "toy.py"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return tmp, tmp / "runs" / "toy", r.stdout


def test_metrics_reach_jsonl_console_and_tensorboard(run):
    tmp, run_dir, stdout = run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    for r in records:  # after steps 1 and 3 (every valid_every=2 steps), every key, finite
        assert (KEYS <= set(r)) == (r["step"] in (1, 3)), r
    for r in records[1], records[3]:
        assert all(math.isfinite(r[k]) for k in KEYS)
        assert all(r[k] > 1 for k in KEYS if "ppl" in k) and all(0 <= r[k] <= 1 for k in KEYS if "passkey" in k)
    assert records[1]["val/ppl@32"] != records[3]["val/ppl@32"]  # measured again on the trained weights
    for step in (1, 3):
        line = next(x for x in stdout.splitlines() if x.startswith(f"long-context eval after step {step}: "))
        assert f"ppl@128 {records[step]['val/ppl@128']:.4g}" in line and "passkey@256/yarn" in line
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [(e.step, round(e.value, 3)) for e in events.Scalars("val/ppl@128/yarn")] == \
        [(s, round(records[s]["val/ppl@128/yarn"], 3)) for s in (1, 3)]


def test_numbers_are_those_of_eval_ppl_on_the_checkpoint(run):
    tmp, run_dir, _ = run
    out = tmp / "ppl"
    r = spindle("eval", "ppl", "--ckpt", str(run_dir / "ckpt"), "--data", str(tmp / "text"), "--glob", "*.txt",
                "--lengths", "32,128", "--variants", "plain,yarn", "--windows", "2", "--chunk", "48", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "ppl.json").read_text())
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])  # the final weights: step 3
    for variant, suffix in (("plain", ""), ("yarn", "/yarn")):
        for L in (32, 128):
            assert last[f"val/ppl@{L}{suffix}"] == pytest.approx(res["variants"][variant]["length"][str(L)]["ppl"],
                                                                 rel=1e-5)


def test_eval_plot_writes_a_png(run):
    tmp, run_dir, _ = run
    r = spindle("eval", "plot", str(run_dir))
    assert r.returncode == 0, r.stderr
    png = run_dir / "long_context.png"
    assert r.stdout.strip() == f"wrote {png} (ppl, passkey at steps 1, 3)"
    import matplotlib.image

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(str(png))
    assert img.shape[0] > 200 and img.shape[1] > 600 and img.std() > 0  # two panels with something drawn
    r = spindle("eval", "plot", str(run_dir / "metrics.jsonl"), "--out", str(tmp / "curves.png"))
    assert r.returncode == 0 and (tmp / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("where, message", [
    ("missing", "spindle: error: eval plot {p}: not found"),
    ("folder", "spindle: error: eval plot {p}: no metrics.jsonl in this folder"),
    ("empty", "spindle: error: eval plot {p}/metrics.jsonl: no val/ppl@L or val/passkey@L records (0 lines;"),
])
def test_eval_plot_refuses_in_one_line(tmp_path, where, message):
    p = tmp_path / "run"
    if where != "missing":
        p.mkdir()
    if where == "empty":
        (p / "metrics.jsonl").write_text("")
    r = spindle("eval", "plot", str(p))
    assert r.returncode == 2 and r.stderr.startswith(message.format(p=p)) and r.stderr.count("\n") == 1, r.stderr
