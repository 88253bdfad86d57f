"""Training stages of the RoPE scaling-law reproduction, driven through Spindle's own Trainer.

Every stage writes under work/ and is skipped when its output already exists, so the study can be
stopped and resumed (delete a folder under work/ to redo a stage).
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"

# The model of rope.md §4.3: 4 layers, d_model 128, 2 heads of 64, byte vocabulary, T_train 256.
T_TRAIN = 256
HEAD_DIM = 64
MODEL = dict(
    hidden_size=128, num_attention_heads=2, num_kv_attention_heads=2, num_layers=4, mlp_ratio=4.0,
    multiple_of=16, vocab_size=258, use_swiglu=False, norm_type="rmsnorm", dtype="torch.float32",
    max_position_embeddings=T_TRAIN,
)


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py")
                  if p.is_file() and not any(part in skip for part in p.relative_to(root).parts))


def split_files(n_eval: int = 24, min_eval_bytes: int = 20_000) -> tuple[list[Path], list[Path]]:
    """Hold out `n_eval` long files, chosen by a hash of their relative path (identical everywhere)."""
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    def h(p: Path) -> str:
        return hashlib.sha256(str(p.relative_to(root)).encode()).hexdigest()
    long = sorted((p for p in files if p.stat().st_size >= min_eval_bytes), key=h)
    held = set(long[:n_eval])
    return [p for p in files if p not in held], sorted(held)


def prepare_data(log=print) -> dict:
    """Byte-level shards of the training files (spindle prepare) and the list of held-out files."""
    from spindle.data.prepare import prepare

    out = WORK / "data"
    info_file = out / "split.json"
    if info_file.exists():
        return json.loads(info_file.read_text())
    train, held = split_files()
    t0 = time.time()
    prepare([str(p) for p in train], str(out / "train" / "code"), "byte", workers=1, doc_per_file=True,
            overwrite=True, progress=False)
    info = {"train_files": len(train), "train_bytes": sum(p.stat().st_size for p in train),
            "eval_files": [str(p) for p in held], "eval_bytes": sum(p.stat().st_size for p in held)}
    info_file.write_text(json.dumps(info, indent=1))
    log(f"data: {info['train_files']} training files ({info['train_bytes'] / 1e6:.1f} MB), "
        f"{len(held)} held out; {time.time() - t0:.0f} s")
    return info


def train_config(name: str, base: float, steps: int, lr: float, warmup_ratio: float, eta_min: float,
                 micro_bsz: int, init_from: str | None = None, seq_len: int = T_TRAIN, seed: int = 1234) -> dict:
    """A plain Spindle config dict (the same keys a configs/*.py file sets)."""
    # checkpoints every 100 steps + auto_resume: a stage that is killed continues where it stopped
    ckpt = dict(enable_save_ckpt=True, save_ckpt_folder=str(WORK / "runs" / name / "ckpt"), auto_resume=True,
                checkpoint_every=100, keep_last_n=1)
    if init_from is not None:
        # the paper's procedure: model weights only, fresh optimizer / schedule / data order, new base
        ckpt["load_ckpt_info"] = dict(path=init_from, content=("model",))
    return {
        "JOB_NAME": name,
        "ckpt": ckpt,
        "data": dict(type="tokenized", train_folder=str(WORK / "data" / "train"), tokenizer_path="byte",
                     seq_len=seq_len, micro_bsz=micro_bsz, micro_num=1, total_steps=steps, pack_sample_into_one=True,
                     seed=seed),
        "model": dict(MODEL, rope_base=float(base), max_position_embeddings=seq_len),
        "adam": dict(lr=lr, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.1),
        "lr_scheduler": dict(warmup_ratio=warmup_ratio, eta_min=eta_min),
        "hybrid_zero_optimizer": dict(clip_grad_norm=1.0),
        "trainer": dict(run_folder=str(WORK / "runs"), seed=seed, log_every=50, progress_bar=False,
                        tensorboard=False, device="cpu",
                        num_threads=int(os.environ.get("SPINDLE_THREADS", "2"))),
    }


def final_checkpoint(name: str) -> Path | None:
    ck = WORK / "runs" / name / "ckpt"
    steps = sorted(int(p.stem) for p in ck.glob("*.step")) if ck.is_dir() else []
    return ck / str(steps[-1]) if steps else None


def train(raw: dict, log=print) -> Path:
    """Run one training stage with spindle.train.Trainer unless its final checkpoint exists."""
    from spindle.config import validate_config
    from spindle.parallel.mesh import ParallelEnv
    from spindle.train.trainer import Trainer

    name = raw["JOB_NAME"]
    done = final_checkpoint(name)
    if done is not None and done.name == str(raw["data"]["total_steps"]):
        log(f"[{name}] done already: {done}")
        return done
    cfg = validate_config(raw, name)
    t0 = time.time()
    lines: list[str] = []
    tr = Trainer(cfg, ParallelEnv(), log=lambda *a: lines.append(" ".join(map(str, a))))
    out = tr.fit()
    hist = out["history"]
    path = final_checkpoint(name)
    rec = {"name": name, "base": raw["model"]["rope_base"], "steps": len(hist), "seconds": round(time.time() - t0, 1),
           "loss_first": hist[0]["loss"], "loss_last": sum(h["loss"] for h in hist[-20:]) / len(hist[-20:]),
           "tokens": hist[-1]["num_consumed_tokens"], "init_from": raw["ckpt"].get("load_ckpt_info")}
    (WORK / "runs" / name / "summary.json").write_text(json.dumps(rec, indent=1))
    log(f"[{name}] {rec['steps']} steps in {rec['seconds']:.0f} s, loss {rec['loss_first']:.3f} -> "
        f"{rec['loss_last']:.3f}; {path}")
    return path
