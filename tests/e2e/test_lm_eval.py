"""The `spindle` lm-evaluation-harness model (spindle/eval/harness.py) against lm-eval's own `hf` backend on the
`spindle convert to-hf` copy of the same checkpoint: the same per-sample log-likelihoods (multiple choice and
rolling) and the same greedy generations, on local YAML tasks over JSON files this test writes (no hub).
Also `spindle eval tasks` and the model_args a user gets wrong."""

import json
import re
from pathlib import Path

import pytest

from helpers import run_cli as spindle

pytest.importorskip("lm_eval", reason="lm-evaluation-harness: pip install -e '.[test]'")

PARITY = 1e-4  # nats, per sample
MAX_LENGTH = 64  # tokens a forward sees: the rolling text below spans three windows of it
TASKS = ["spindle_mc", "spindle_text", "spindle_gen"]
QUESTIONS = [("def f(x):\n    return", [" x + 1", " y", " x * 2"], 0),
             ("def g(", ["x):", "):", "1"], 0),
             ("    return x", [" + 1\n", " - 9\n"], 0),
             ("", ["def f(x):", "return"], 0)]  # an empty context: scored after BOS
TEXTS = ["def f(x):\n    return x + 1\n" * 5, "return x + 1\n", "def h(y):\n    return y\n"]


def metrics(*entries: tuple[str, str, bool]) -> str:
    """A metric_list naming each metric's aggregation and direction (else lm-eval warns about each)."""
    return "metric_list:\n" + "".join(f"  - metric: {name}\n    aggregation: {agg}\n"
                                      f"    higher_is_better: {str(up).lower()}\n" for name, agg, up in entries)


def write_tasks(folder: Path) -> Path:
    """Three tasks (one per request type lm-eval has) over JSON lines files, as a user writes their own."""
    folder.mkdir(exist_ok=True)
    mc, text = folder / "mc.jsonl", folder / "text.jsonl"
    mc.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))

    def task(name: str, data: Path, body: str) -> None:
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}")

    task("spindle_mc", mc, "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
         "doc_to_target: '{{answer}}'\ntarget_delimiter: ''\n" + metrics(("acc", "mean", True)))
    task("spindle_text", text, "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
         + metrics(("word_perplexity", "weighted_perplexity", False), ("bits_per_byte", "bits_per_byte", False)))
    task("spindle_gen", mc, "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
         "doc_to_target: '{{choices[answer]}}'\ngeneration_kwargs:\n  until: ['\\n']\n  max_gen_toks: 12\n"
         "  do_sample: false\n" + metrics(("exact_match", "mean", True)))
    return folder


@pytest.fixture(scope="module")
def setup(tiny_trained_ckpt):
    """(the Spindle checkpoint, its to-hf copy, the task folder)."""
    tmp, ck = tiny_trained_ckpt
    hf = tmp / "lm_eval_hf"
    if not hf.exists():
        r = spindle("convert", "to-hf", str(ck), str(hf))
        assert r.returncode == 0, r.stderr
    return ck, hf, write_tasks(tmp / "lm_eval_tasks")


def evaluate(model: str, model_args: str, tasks_dir: Path, tasks=TASKS, batch_size: int = 4) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import spindle.eval.harness  # noqa: F401  (registers the spindle model)

    return simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), batch_size=batch_size,
                           device="cpu", log_samples=True,
                           task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False))


def per_sample(results: dict) -> dict:
    """{task: [each sample's responses: (log-likelihood, greedy) per choice, the rolling log-likelihood, or the
    generated text]}, in document order."""
    return {task: [s["resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
            for task, samples in results["samples"].items()}


def largest_gap(ours: dict, theirs: dict) -> float:
    gap = 0.0
    for task in ("spindle_mc", "spindle_text"):
        for a, b in zip(ours[task], theirs[task], strict=True):
            for x, y in zip(a, b, strict=True):
                x, y = (x[0], y[0]) if isinstance(x, (list, tuple)) else (x, y)
                x, y = (x[0], y[0]) if isinstance(x, (list, tuple)) else (x, y)  # (ll, greedy) inside a list
                gap = max(gap, abs(float(x) - float(y)))
    return gap


@pytest.mark.slow
def test_same_per_sample_loglikelihoods_as_lm_evals_hf_backend(setup):
    ck, hf, tasks = setup
    theirs = evaluate("hf", f"pretrained={hf},dtype=float32,max_length={MAX_LENGTH}", tasks)
    ours = evaluate("spindle", f"ckpt={ck},max_length={MAX_LENGTH}", tasks)
    a, b = per_sample(ours), per_sample(theirs)
    gap = largest_gap(a, b)
    print(f"largest per-sample log-likelihood gap, spindle vs hf backend: {gap:.2e} nats")
    assert gap < PARITY
    assert a["spindle_gen"] == b["spindle_gen"]  # greedy generations, text for text
    assert len(a["spindle_mc"]) == len(QUESTIONS) and len(a["spindle_text"]) == len(TEXTS)
    for task in TASKS:  # the aggregate scores follow
        for key, value in theirs["results"][task].items():
            if isinstance(value, float):
                assert ours["results"][task][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (task, key)
    # the HF folder read in place by Spindle (no conversion back) scores the same, one request per forward
    in_place = per_sample(evaluate("spindle", f"ckpt={hf},max_length={MAX_LENGTH}", tasks, ["spindle_mc"], 1))
    assert largest_gap({**a, **in_place}, a) < PARITY


def model(ck, **model_args):
    from spindle.eval.harness import SpindleLM

    return SpindleLM(ckpt=str(ck), **model_args)


def test_rope_variants_change_scores_past_the_training_length_and_batches_never_do(setup):
    ck, _, _ = setup
    long_ids = [list(range(40, 40 + 50)), list(range(60, 60 + 70)), list(range(50, 50 + 40))]
    requests = [(None, ids[:-5], ids[-5:]) for ids in long_ids]  # 45..65 tokens: past the training length, 32
    plain = [ll for ll, _ in model(ck, max_length=96)._loglikelihood_tokens(requests)]
    for rope in ("dynamic", "yarn:2", "ntk:4+logn"):
        one = [ll for ll, _ in model(ck, max_length=96, rope=rope)._loglikelihood_tokens(requests)]
        batched = [ll for ll, _ in model(ck, max_length=96, rope=rope, batch_size=3)._loglikelihood_tokens(requests)]
        assert batched == pytest.approx(one, abs=1e-5), rope  # Dynamic NTK: only equal lengths share a forward
        assert max(abs(x - y) for x, y in zip(one, plain)) > 1e-3, rope


def test_spindle_eval_tasks_prints_the_scores(setup, tmp_path):
    ck, _, tasks = setup
    out = tmp_path / "results.json"
    r = spindle("eval", "tasks", "--ckpt", ck, "--tasks", "spindle_mc,spindle_text", "--include-path", tasks,
                "--model-args", f"max_length={MAX_LENGTH}", "--batch-size", "4", "--device", "cpu", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "spindle_mc" in r.stdout and "acc" in r.stdout and "bits_per_byte" in r.stdout
    assert set(json.loads(out.read_text())["results"]) == {"spindle_mc", "spindle_text"}


@pytest.mark.parametrize("args, says", [
    (["--model-args", "rope_scale=2"], "--model_args rope_scale: not an argument of the spindle model"),
    (["--model-args", "rope=warp:3"], "variant 'warp:3'"),
    (["--model-args", "dtype=int8"], "dtype='int8': expected one of float32"),
    (["--device", "tpu"], "device 'tpu': expected cpu, cuda or cuda:N"),
    (["--ckpt", "runs/a,b"], "--ckpt runs/a,b: a path with ',' or '=' cannot pass through lm-eval's model_args"),
])
def test_bad_model_args_are_one_line(setup, args, says):
    ck, _, tasks = setup
    r = spindle("eval", "tasks", "--ckpt", ck, "--tasks", "spindle_mc", "--include-path", tasks, *args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert says in r.stderr


@pytest.mark.slow
def test_torchrun_ranks_are_lm_eval_ranks(setup, tmp_path):
    """Two processes under torchrun share the requests (lm-eval's rank / world_size) and rank 0 alone prints and
    writes the scores, which are those of one process."""
    import os
    import subprocess
    import sys

    ck, _, tasks = setup
    args = ["eval", "tasks", "--ckpt", str(ck), "--tasks", "spindle_mc,spindle_text", "--include-path", str(tasks),
            "--model-args", f"max_length={MAX_LENGTH}", "--device", "cpu", "--batch-size", "4"]
    r = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
                        "-m", "spindle.cli", *args, "--out", str(tmp_path / "two.json")], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    # lm-eval's progress bars on stderr: each rank tokenizes its half of the 10 multiple-choice requests
    shares = re.findall(r"Tokenizing inputs: 100%\S* (\d+)/\d+ \[", r.stderr)
    assert sorted(map(int, shares)) == [5, 5], shares
    assert r.stdout.count("|spindle_mc") == 1  # rank 0 alone prints
    one = spindle(*args, "--out", tmp_path / "one.json")
    assert one.returncode == 0, one.stderr
    two, one = (json.loads((tmp_path / n).read_text())["results"] for n in ("two.json", "one.json"))
    assert set(two) == set(one) == {"spindle_mc", "spindle_text"}
    for task, scores in one.items():
        for key, value in scores.items():
            assert two[task][key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key
