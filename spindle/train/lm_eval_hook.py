"""lm-evaluation-harness tasks on the model being trained (`long_eval.tasks`): every `every` steps (default
`data.valid_every`) rank 0 scores the tasks with the `spindle` lm-eval model (spindle/eval/harness.py) on its
whole copy of the model, and the scores join the step's record as `lm_eval/{task}/{metric}` (so metrics.jsonl,
TensorBoard and the experiment trackers get them).

Where it runs: inside spindle.train.long_eval.LongEval, which gathers the whole model once for both evaluations
(spindle.parallel.gather.whole_model: collective under sharded or staged layouts) and runs them on rank 0 while
the other ranks wait at the next step. The harness sees one process (rank 0 of 1) whatever the launch, so it
never calls a collective the other ranks are not in.

What it leaves alone: the training RNG (lm-eval's own seeding is switched off, and the global generators of
Python, NumPy and torch are saved and put back around each evaluation, so a resumed run stays bit-exact) and the
model's train/eval mode. What may go wrong is checked when the trainer is built, on every rank: lm-eval
installed, the include folder, every task name found, the tokenizer within model.vocab_size. An evaluation that
fails during training (a task's data file gone) is one line and no scores: a long run does not die of its
evaluation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from typing import Iterator

import torch

from spindle.config.long_eval import LmEvalTasksConfig
from spindle.errors import SpindleError
from spindle.extras import require

logger = logging.getLogger(__name__)
FEATURE = "long_eval.tasks (lm-evaluation-harness during training)"


@contextlib.contextmanager
def global_rng_kept(device: torch.device) -> Iterator[None]:
    """Python's, NumPy's and torch's global generators (CUDA's too) as they were, whatever runs inside."""
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def task_scores(results: dict) -> dict[str, float]:
    """lm-eval's results -> {lm_eval/{task}/{metric}: score}: numbers only, no standard errors; a metric's filter
    kept in its name unless it is lm-eval's default ('acc,none' -> acc, 'exact_match,strict-match' ->
    exact_match/strict-match)."""
    out = {}
    for task, scores in results.items():
        for key, value in scores.items():
            metric, comma, applied = key.partition(",")
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not comma or not number or metric.endswith("_stderr"):
                continue  # a score is "metric,filter"; sample_len, alias and the like are not
            out[f"lm_eval/{task}/{metric}" + (f"/{applied}" if applied != "none" else "")] = float(value)
    return out


def training_lm(model, tokenizer, train_len: int, max_length, batch_size: int):
    """The `spindle` lm-eval model (spindle.eval.harness.SpindleLM) on a model in memory, the one being trained,
    instead of a checkpoint folder: what its __init__ sets from a checkpoint, set from `model`, on the device the
    model is on; lm-eval rank 0 of 1 whatever the launch. tests/e2e/test_train_lm_eval.py checks that its scores
    are those of `spindle eval tasks` on the checkpoint saved at the same step."""
    from spindle.eval.harness import SpindleLM, TemplateLM

    lm = SpindleLM.__new__(SpindleLM)
    TemplateLM.__init__(lm)  # lm-eval's own state: rank 0 of 1, the cache hook
    lm._batch_size, lm._max_gen_toks = batch_size, 256
    lm._device = next(model.parameters()).device
    lm.train_len, lm._max_length = train_len, max_length or train_len
    lm.model, lm.tokenizer, lm.vocab_size = model, tokenizer, model.args.vocab_size
    lm.length_dependent_rope = model.rotary.varies_with_length
    return lm


class TrainingTasks:
    """Built with the trainer on every rank (its checks fail everywhere at start-up); `run(model, step)` on rank 0
    returns the step's scores."""

    def __init__(self, cfg, device: torch.device):
        t: LmEvalTasksConfig = cfg.long_eval.tasks
        self.t, self.device, self.train_len = t, device, cfg.data.seq_len
        self.every = t.every or cfg.data.valid_every
        if not self.every:
            raise SpindleError("long_eval.tasks.every: expected a number of steps (or set data.valid_every)")
        self.simple_evaluate = require("lm_eval", "eval", FEATURE).simple_evaluate
        if t.include_path is not None and not os.path.isdir(t.include_path):
            raise SpindleError(f"long_eval.tasks.include_path {t.include_path}: no such folder (lm-eval task YAML "
                               "files)")
        from spindle.eval.lm_tasks import task_manager
        from spindle.data.tokenizer import load_tokenizer

        try:
            self.manager = task_manager(list(t.names), t.include_path, FEATURE)
        except SpindleError as exc:  # its line names --tasks, the command line's option
            raise SpindleError("long_eval.tasks.names " + str(exc).removeprefix("--tasks ")) from None
        self.tokenizer = load_tokenizer(cfg.data.tokenizer_path or "default")
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise SpindleError(f"long_eval.tasks: the tokenizer has {self.tokenizer.vocab_size} ids, model.vocab_size "
                               f"is {cfg.model.vocab_size}")
        names = ", ".join(t.names)
        logger.info(f"long_eval: lm-eval tasks {names} every {self.every} steps"
                    + (f", at most {t.limit:g} samples each" if t.limit else ""))

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def run(self, model, step: int) -> dict[str, float]:
        """The scores of `model` (a whole model on this rank: its mode put back) after `step` trained steps."""
        t, was_training = self.t, model.training
        lm = training_lm(model, self.tokenizer, self.train_len, t.max_length, t.batch_size)
        t0 = time.perf_counter()
        try:
            model.eval()
            with global_rng_kept(self.device):
                results = self.simple_evaluate(
                    model=lm, tasks=list(t.names), num_fewshot=t.num_fewshot, limit=t.limit, task_manager=self.manager,
                    bootstrap_iters=0, log_samples=False, random_seed=None, numpy_random_seed=None,
                    torch_random_seed=None)
        except Exception as exc:  # noqa: BLE001 - the run goes on; the other ranks are already waiting for it
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            logger.warning(f"lm-eval after step {step - 1} failed ({type(exc).__name__}: {first}); no scores this "
                           "time, training goes on")
            return {}
        finally:
            model.train(was_training)
        scores = task_scores(results["results"])
        said = ", ".join(f"{k.removeprefix('lm_eval/')} {v:.4g}" for k, v in scores.items())
        logger.info(f"lm-eval after step {step - 1}: {said} ({time.perf_counter() - t0:.1f} s)")
        return scores
