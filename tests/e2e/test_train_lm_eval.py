"""long_eval.tasks (spindle/train/lm_eval_hook.py): lm-evaluation-harness tasks on the model being trained, from
local YAML tasks over JSON files this test writes (no hub). The scores land in metrics.jsonl at their cadence,
equal those of `spindle eval tasks` on the checkpoint saved at the same step, and leave training untouched (the
same losses, dropout on, as a run without them)."""

import json
from pathlib import Path

import pytest

from helpers import run_cli as spindle, tiny_config_text

pytest.importorskip("lm_eval", reason="lm-evaluation-harness: pip install -e '.[test]'")

TASKS = ["spindle_mc", "spindle_text"]
QUESTIONS = [("def f(x):\n    return", [" x + 1", " y"], 0), ("def g(", ["x):", "1"], 0),
             ("    return x", [" + 1", "!"], 0)]
TEXTS = ["def f(x):\n    return x + 1\n" * 3, "return x + 1\n"]


def write_tasks(folder: Path) -> Path:
    """A multiple-choice task and a rolling log-likelihood task over JSON lines files, as a user writes them."""
    folder.mkdir()
    mc, text = folder / "mc.jsonl", folder / "text.jsonl"
    mc.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        "task: spindle_mc\n" + head.format(mc) + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\ntarget_delimiter: ''\nmetric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "text.yaml").write_text(
        "task: spindle_text\n" + head.format(text) + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n"
        "  - metric: word_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n"
        "  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n")
    return folder


def config(tmp: Path, name: str, **sections) -> Path:
    path = tmp / f"{name}.py"
    path.write_text(tiny_config_text(
        tmp / "runs", JOB_NAME=name, ckpt={"enable_save_ckpt": True, "auto_resume": False},
        data={"type": "text", "train_folder": str(tmp / "text"), "text_glob": "*.txt", "tokenizer_path": "byte",
              "seq_len": 32, "micro_num": None, "pack_sample_into_one": True},
        model={"vocab_size": 258, "max_position_embeddings": 32, "drop_rate": 0.1}, **sections))
    return path


def write_text(tmp: Path) -> None:
    """The training files: a few Python-like lines."""
    (tmp / "text").mkdir()
    for i in range(3):
        (tmp / "text" / f"doc{i}.txt").write_text("def f(x):\n    return x + 1\n" * (20 + 5 * i))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(folder, the task folder, metrics.jsonl records of the run with tasks every 2 steps, of the run without)."""
    tmp = tmp_path_factory.mktemp("train_lm_eval")
    write_text(tmp)
    tasks = write_tasks(tmp / "tasks")
    records = {}
    for name, extra in (("with", {"long_eval": {"tasks": {"names": TASKS, "include_path": str(tasks), "every": 2}}}),
                        ("without", {})):
        r = spindle("train", "--config", config(tmp, name, **extra))
        assert r.returncode == 0, r.stderr
        records[name] = [json.loads(line) for line in (tmp / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return tmp, tasks, records["with"], records["without"]


@pytest.mark.slow  # the module fixture: two trainings and lm-eval's import (about 20 s)
def test_scores_at_their_cadence_and_training_untouched(runs):
    _, _, with_tasks, without = runs
    scored = [r["step"] for r in with_tasks if "lm_eval/spindle_mc/acc" in r]
    assert scored == [1, 3]  # after 2 and 4 trained steps
    for r in with_tasks:
        if r["step"] in scored:
            assert 0 <= r["lm_eval/spindle_mc/acc"] <= 1 and r["lm_eval/spindle_text/bits_per_byte"] > 0
            # scores only: lm-eval's sample_len and alias are not
            scores = sorted(k.removeprefix("lm_eval/") for k in r if k.startswith("lm_eval/"))
            assert scores == ["spindle_mc/acc", "spindle_text/bits_per_byte", "spindle_text/word_perplexity"]
    # dropout draws from the training RNG every step: the evaluations moved none of it
    assert [r["loss"] for r in with_tasks] == [r["loss"] for r in without]


@pytest.mark.slow  # the module fixture
def test_scores_equal_spindle_eval_tasks_on_the_checkpoint_of_the_same_step(runs):
    tmp, tasks, with_tasks, _ = runs
    out = tmp / "after.json"
    r = spindle("eval", "tasks", "--ckpt", tmp / "runs" / "with" / "ckpt", "--tasks", ",".join(TASKS),
                "--include-path", tasks, "--device", "cpu", "--out", out)
    assert r.returncode == 0, r.stderr
    theirs = json.loads(out.read_text())["results"]
    last = with_tasks[-1]
    assert last["lm_eval/spindle_mc/acc"] == theirs["spindle_mc"]["acc,none"]
    for metric in ("word_perplexity", "bits_per_byte"):
        assert last[f"lm_eval/spindle_text/{metric}"] == pytest.approx(theirs["spindle_text"][f"{metric},none"],
                                                                        rel=1e-6)


@pytest.mark.parametrize("tasks, says", [
    ({"names": ["spindle_mc"], "include_path": "{tmp}/nowhere", "every": 2},
     "long_eval.tasks.include_path {tmp}/nowhere: no such folder (lm-eval task YAML files)"),
    ({"names": ["spindle_mc"], "include_path": "{tasks}"},
     "long_eval.tasks.every: expected a number of steps (or set data.valid_every)"),
    ({"names": ["spindle_mc"], "include_path": "{tasks}", "max_length": 1}, "long_eval.tasks.max_length"),
    ({"names": [""]}, "long_eval.tasks.names"),
], ids=["include_path", "every", "max_length", "names"])
def test_bad_task_keys_are_one_line_before_training(tmp_path, tasks, says):
    write_text(tmp_path)
    fill = {"tmp": tmp_path, "tasks": write_tasks(tmp_path / "tasks")}
    tasks = {k: v.format(**fill) if isinstance(v, str) else v for k, v in tasks.items()}
    r = spindle("train", "--config", config(tmp_path, "bad", long_eval={"tasks": tasks}))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert says.format(**fill) in r.stderr
    assert not (tmp_path / "runs" / "bad" / "metrics.jsonl").exists()


@pytest.mark.slow  # lm-eval's import and its task index in a fresh process (about 20 s alone)
def test_an_evaluation_failing_mid_run_is_one_line_and_training_goes_on(tmp_path, monkeypatch):
    """A task's data gone after the start, a bug in lm-eval: rank 0 says so in one line, the run trains to the end."""
    import lm_eval

    def broken(**kwargs):
        raise FileNotFoundError(f"{tmp_path}/tasks/mc.jsonl\nand a long traceback")

    monkeypatch.setattr(lm_eval, "simple_evaluate", broken)
    write_text(tmp_path)
    tasks = {"names": ["spindle_mc"], "include_path": str(write_tasks(tmp_path / "tasks")), "every": 2}
    r = spindle("train", "--config", config(tmp_path, "broken", long_eval={"tasks": tasks}))
    assert r.returncode == 0, r.stderr
    said = [line for line in (r.stdout + r.stderr).splitlines() if "lm-eval after step" in line]
    assert said == [f"lm-eval after step {s} failed (FileNotFoundError: {tmp_path}/tasks/mc.jsonl); no scores this "
                    "time, training goes on" for s in (1, 3)], said
    records = (tmp_path / "runs" / "broken" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 4 and "lm_eval/" not in "".join(records)


@pytest.mark.slow
def test_two_ranks_rank_0_scores_and_the_other_waits(tmp_path):
    """Under torchrun (2 CPU ranks, the optimizer state sharded over them) rank 0 alone runs lm-eval, as one
    process, on the gathered model; rank 1 goes on to the next step and waits there; the run ends normally."""
    import os
    import subprocess
    import sys

    write_text(tmp_path)
    tasks = {"names": ["spindle_mc"], "include_path": str(write_tasks(tmp_path / "tasks")), "every": 2}
    path = config(tmp_path, "two", long_eval={"tasks": tasks}, parallel={"timeout_s": 120})
    r = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
                        "-m", "spindle.cli", "train", "--config", str(path)], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "runs" / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records if "lm_eval/spindle_mc/acc" in rec] == [1, 3]
    said = [line for line in r.stdout.splitlines() if "lm-eval after step" in line]
    assert len(said) == 2 and said[0].startswith("lm-eval after step 1: spindle_mc/acc "), r.stdout  # rank 0 alone
