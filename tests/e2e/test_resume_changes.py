"""A resume explains every change (issue 25, point 2): what the checkpoint cannot carry is refused in one line,
a new micro_bsz / seq_len / packing / micro_num / data-parallel size trains on from the same token of the same
global order — the tokens consumed across the change are those of an uninterrupted run — and every change is
said once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import collecting, tiny_cfg, tiny_config_text
from spindle.errors import SpindleError
from spindle.logs import quiet
from spindle.parallel.mesh import ParallelEnv
from spindle.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
TEXT = "\n".join(f"line {i}: the quick brown fox {i * 7 % 13} jumps over the lazy dog." for i in range(300))
CODE = "\n".join(f"def f{i}(x):\n    return x * {i} + {i % 5}" for i in range(300))
P = 32  # the pack of the run that starts the order: micro_bsz 2 x seq_len 16
CUT = 3  # the first run saves at this step; its packs cover tokens [0, CUT * P) of the order


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from spindle.data.prepare import prepare

    root = tmp_path_factory.mktemp("data")
    for name, text in (("en", TEXT), ("code", CODE)):  # two sources: a cut pack may hold pieces of both
        (root / f"{name}.txt").write_text(text)
        prepare([str(root / f"{name}.txt")], str(root / "train" / name), "byte", overwrite=True, progress=False)
    return root / "train"


def cfg(run: Path, data: Path, total: int, **changes):
    model = {"vocab_size": 258, "max_position_embeddings": 32, "num_layers": 1}
    model |= changes.pop("model", {})
    ckpt = {"enable_save_ckpt": True, "save_ckpt_folder": str(run / "ckpt"), "checkpoint_every": CUT}
    ckpt |= changes.pop("ckpt", {})
    adam = changes.pop("adam", {})
    return tiny_cfg(run, JOB_NAME="r", data={"train_folder": str(data), "total_steps": total, **changes},
                    model=model, lr_scheduler={"total_steps": 9, "warmup_ratio": 0.0}, adam=adam, ckpt=ckpt)


def trained(config, lines: list | None = None, env: ParallelEnv | None = None) -> list[tuple[list, list, list]]:
    """(input ids, labels, source ids) of every step the run trains, each flattened in the order of the stream."""
    seen = []

    class Recording(Trainer):
        def train_step(self, micro_batches):
            seen.append(tuple(sum((b.__dict__[k].flatten().tolist() for b in micro_batches), [])
                              for k in ("input_ids", "labels", "type_ids")))
            return super().train_step(micro_batches)

    with collecting(lines) if lines is not None else quiet():
        Recording(config, env or ParallelEnv()).fit()
    return seen


def stream(steps) -> tuple[list, list, list]:
    return tuple(sum((s[k] for s in steps), []) for k in range(3))


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """9 steps of 32 tokens without a break: the order every resumed run below must follow."""
    return stream(trained(cfg(tmp_path_factory.mktemp("full"), data, 9)))


@pytest.mark.parametrize("change, said", [
    ({"micro_bsz": 4}, "resume: data.micro_bsz 2 -> 4; packs of 32 -> 64 tokens: the data continues from the same "
     "token of the same order"),
    ({"micro_bsz": 3}, "resume: data.micro_bsz 2 -> 3; packs of 32 -> 48 tokens"),  # spans cross packs of the order
    ({"seq_len": 32}, "resume: data.seq_len 16 -> 32; packs of 32 -> 64 tokens"),
    ({"seq_len": 8, "micro_bsz": 4}, "resume: data.micro_bsz 2 -> 4, data.seq_len 16 -> 8; the same 32 tokens per "
     "pack"),
    ({"pack_sample_into_one": True}, "resume: data.pack_sample_into_one False -> True; the same 32 tokens per pack"),
    ({"micro_num": 2}, "resume: data.micro_num 1 -> 2: 32 -> 64 tokens per step; the lr schedule continues by "
     "optimizer updates (update 3 of 9)"),
])
def test_a_new_pack_or_step_size_trains_on_from_the_same_token(data, uninterrupted, tmp_path, change, said):
    trained(cfg(tmp_path, data, CUT))
    lines: list[str] = []
    after = stream(trained(cfg(tmp_path, data, 2 * CUT, **change), lines))
    assert said in "\n".join(lines), lines
    resumes = [line for line in lines if line.startswith("resume: ")]
    assert "resume: data.total_steps 3 -> 6" in resumes and len(set(resumes)) == len(resumes), resumes
    n = len(after[0])
    for k in range(3):  # ids, labels, sources: those of the uninterrupted run, from the token it stopped at
        assert after[k] == uninterrupted[k][CUT * P: CUT * P + n]
    if change.get("micro_bsz") == 3:  # a resumed run resumed again (its state counts tokens) stays on the order
        again = stream(trained(cfg(tmp_path, data, 2 * CUT + 1, micro_bsz=3)))
        assert again[0] == uninterrupted[0][CUT * P + n: CUT * P + n + len(again[0])]


@pytest.mark.parametrize("model, key", [
    ({"tie_word_embeddings": True}, "model.tie_word_embeddings False -> True"),
    ({"num_layers": 2}, "model.num_layers 1 -> 2"),
    ({"num_kv_attention_heads": 4}, "model.num_kv_attention_heads 2 -> 4"),
    ({"rope_base": 50000.0}, "model.rope_base 10000.0 -> 50000.0"),
])
def test_a_model_change_the_weights_cannot_carry_is_refused(data, tmp_path, model, key):
    trained(cfg(tmp_path, data, CUT))
    with pytest.raises(SpindleError) as err:
        trained(cfg(tmp_path, data, 2 * CUT, model=model))
    assert str(err.value).startswith(f"resume: {key}") and "\n" not in str(err.value), err.value


def test_a_new_base_from_the_weights_only_is_continued_training(data, tmp_path):
    trained(cfg(tmp_path / "a", data, CUT))
    weights_only = {"auto_resume": False,
                    "load_ckpt_info": {"path": str(tmp_path / "a" / "ckpt"), "content": ["model"]}}
    assert len(trained(cfg(tmp_path / "b", data, 1, model={"rope_base": 50000.0}, ckpt=weights_only))) == 1


def test_another_data_order_is_refused_and_other_keys_are_said_once(data, tmp_path):
    trained(cfg(tmp_path, data, CUT))
    with pytest.raises(SpindleError, match=r"^resume: data.seed 1024 -> 7 makes another order of the training "):
        trained(cfg(tmp_path, data, 2 * CUT, seed=7))
    lines: list[str] = []
    trained(cfg(tmp_path, data, 2 * CUT, adam={"lr": 0.005}), lines)
    said = [line for line in lines if line.startswith("resume: ")]
    assert said == ["resume: data.total_steps 3 -> 6", "resume: adam.lr 0.01 -> 0.005"], lines


def test_another_data_parallel_size_is_said_with_its_tokens_per_step(data, tmp_path, monkeypatch):
    """In process: the first run's checkpoint says it had 2 data-parallel ranks (the loader's global position
    does not depend on the rank count: tests/unit/test_loader.py; a real 2-process run: the test below)."""
    two = {"processes": 2, "dp": 2, "tp": 1, "pp": 1, "cp": 1}
    monkeypatch.setattr("spindle.parallel.layout.Layout.record", lambda layout: two)
    trained(cfg(tmp_path, data, CUT))
    monkeypatch.undo()
    lines: list[str] = []
    trained(cfg(tmp_path, data, 2 * CUT), lines)
    assert ("resume: 2 -> 1 data-parallel ranks (2 -> 1 processes): 64 -> 32 tokens per step; the lr schedule "
            "continues by optimizer updates (update 3 of 9); the data continues from the same position of the same "
            "order") in lines, lines


@pytest.mark.slow
def test_two_processes_resumed_on_one_train_on_the_same_tokens(data, uninterrupted, tmp_path):
    """One real torchrun launch of 2 ranks (gloo) saves at step 2; one process resumes it."""
    (tmp_path / "cfg.py").write_text(tiny_config_text(
        tmp_path, JOB_NAME="r", data={"train_folder": str(data), "total_steps": 2},
        model={"vocab_size": 258, "max_position_embeddings": 32, "num_layers": 1},
        lr_scheduler={"total_steps": 9, "warmup_ratio": 0.0},
        ckpt={"enable_save_ckpt": True, "save_ckpt_folder": str(tmp_path / "ckpt"), "checkpoint_every": 2}))
    r = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
                        str(REPO / "train.py"), "--config", str(tmp_path / "cfg.py")], cwd=tmp_path,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)), capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines: list[str] = []
    after = stream(trained(cfg(tmp_path, data, 5), lines))
    assert ("resume: 2 -> 1 data-parallel ranks (2 -> 1 processes): 64 -> 32 tokens per step; the lr schedule "
            "continues by optimizer updates (update 2 of 9); the data continues from the same position of the same "
            "order") in lines, lines
    assert after[0] == uninterrupted[0][4 * P: 7 * P]  # 2 steps x 2 ranks x 1 pack, then packs 4, 5, 6
