"""Long-context metrics while training: perplexity by length and passkey accuracy every `data.valid_every` steps.

The `long_eval` section (spindle/config/long_eval.py) names the lengths, the RoPE variants and the
passkey grid; the metric names are in spindle/eval/curves.py (`val/ppl@4096`, `val/passkey@8192/yarn`).
Its `tasks` (lm-evaluation-harness tasks, at their own cadence) run here too, on the same gathered model:
spindle/train/lm_eval_hook.py.
The numbers are those of `spindle eval ppl` / `spindle eval passkey` on the same windows: the same
functions compute them (`evaluate_variant`: chunked prefill with the KV cache; `passkey_grid`).

Where it runs: on rank 0, on a whole plain model. One process and plain data parallelism evaluate the
training model itself (its RoPE and train/eval mode put back afterwards); sharded or staged layouts
(FSDP, tensor, pipeline) and context parallelism first gather a plain copy with
`spindle.parallel.gather.whole_model`, collectively, as the closing sample does. The other ranks go on to
the next step and wait there for rank 0, so one evaluation must stay well inside the process group's
timeout (30 minutes by default).

Windows and the tokenizer are prepared on every rank when the trainer is built, so a bad `long_eval` key
fails on all ranks at start-up, before any training. Nothing here draws from the training RNG: the windows
are the first documents of the data, the passkey samples are seeded by `long_eval.seed` with their own
generator, and the global RNG state is saved and put back around each evaluation all the same (so a resumed
run stays bit-exact).
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch

from spindle.config.long_eval import LongEvalConfig
from spindle.errors import SpindleError
from spindle.eval.curves import metric_key

logger = logging.getLogger(__name__)


def long_context_metrics(model, windows: Optional[torch.Tensor], tokenizer, le: LongEvalConfig,
                         train_len: int) -> dict:
    """{val/ppl@L[/variant]: perplexity, val/passkey@L[/variant]: accuracy} for `model` (its RoPE put back)."""
    from spindle.eval.passkey import passkey_grid
    from spindle.eval.perplexity import evaluate_variant, parse_variant

    out: dict = {}
    was_training = model.training
    try:
        for spec in le.variants:
            if le.lengths:
                r = evaluate_variant(model, windows, le.lengths, train_len, parse_variant(spec, train_len), le.chunk)
                out.update({metric_key("ppl", L, spec): r["length"][str(L)]["ppl"] for L in le.lengths})
            if le.passkey_lengths:
                g = passkey_grid(model, tokenizer, le.passkey_lengths, le.passkey_depths, le.passkey_samples, spec,
                                 train_len, le.seed, le.passkey_mode, le.chunk)
                out.update({metric_key("passkey", L, spec): sum(row) / len(row)
                            for L, row in zip(le.passkey_lengths, g["accuracy"])})
    finally:
        model.train(was_training)
    return out


def _as_key(exc: SpindleError, key: str) -> SpindleError:
    """The eval modules' errors name their command-line option; here the config key is what to change."""
    return SpindleError(f"{key}: " + str(exc).removeprefix("--lengths "))


class LongEval:
    """Built with the trainer; `le(step)` returns the step's metrics ({} when off, not due, or not rank 0)."""

    def __init__(self, cfg, env, raw_model):
        self.le: LongEvalConfig = cfg.long_eval
        self.every, self.train_len = cfg.data.valid_every, cfg.data.seq_len
        self.env, self.raw_model, self.args = env, raw_model, cfg.model.to_args()
        self.windows = self.tokenizer = None
        if self.le.enabled:
            self._prepare(cfg)
        self.tasks = None  # lm-eval tasks at their own cadence (spindle/train/lm_eval_hook.py)
        if self.le.tasks.names:
            from spindle.train.lm_eval_hook import TrainingTasks

            self.tasks = TrainingTasks(cfg, env.device)

    def _prepare(self, cfg) -> None:
        from spindle.data.tokenizer import load_tokenizer
        from spindle.eval.passkey import make_sample
        from spindle.eval.perplexity import checkpoint_data, load_token_docs, make_windows

        le, vocab = self.le, cfg.model.vocab_size
        self.tokenizer = load_tokenizer(cfg.data.tokenizer_path or "default")
        if le.lengths:
            if le.data:
                paths, what = list(le.data), f"long_eval.data {', '.join(le.data)}"
            else:
                paths, what = checkpoint_data(cfg, option="long_eval.data", whose="the")
            docs = load_token_docs(paths, self.tokenizer, "*", enough=(le.windows, le.lengths[-1]),
                                   option="long_eval.data")
            try:
                windows, natural = make_windows(docs, le.lengths[-1], le.windows)
            except SpindleError as exc:
                raise SpindleError(f"long_eval.lengths {le.lengths[-1]}: {exc} ({what})") from None
            if int(windows.max()) >= vocab:
                raise SpindleError(f"long_eval.data: token id {int(windows.max())} >= model.vocab_size {vocab} "
                                   f"({what}; read with the tokenizer {cfg.data.tokenizer_path or 'default'})")
            self.windows = windows.to(self.env.device)
            logger.info(f"long_eval: perplexity at {', '.join(map(str, le.lengths))} tokens on {windows.shape[0]} "
                        f"windows ({natural} whole-document starts) of {what}; variants {', '.join(le.variants)}")
        if le.passkey_lengths:
            if self.tokenizer.vocab_size > vocab:
                raise SpindleError(f"long_eval.passkey_lengths: the tokenizer has {self.tokenizer.vocab_size} ids, "
                                   f"model.vocab_size is {vocab}")
            try:
                make_sample(self.tokenizer, le.passkey_lengths[0], 0.0)  # the template must fit the shortest
            except SpindleError as exc:
                raise _as_key(exc, "long_eval.passkey_lengths") from None
            depths = ", ".join(f"{d:g}" for d in le.passkey_depths)
            logger.info(f"long_eval: passkey ({le.passkey_mode}) at {', '.join(map(str, le.passkey_lengths))} "
                        f"tokens, depths {depths}, {le.passkey_samples} samples per cell")
        longest = max(le.lengths + le.passkey_lengths)
        from spindle.eval.prefill import check_cache_memory

        try:
            check_cache_memory(self.raw_model, longest, args=self.args)
        except SpindleError as exc:
            raise _as_key(exc, "long_eval") from None

    def __call__(self, step: int) -> dict:
        context_due = self.le.enabled and step % self.every == 0
        tasks_due = self.tasks is not None and self.tasks.due(step)
        if not (context_due or tasks_due):  # the same answer on every rank: the gather below is collective
            return {}
        from spindle.parallel.gather import whole_model

        model = whole_model(self.raw_model, self.args, self.env)  # collective where the layout shards or slices
        if model is None:
            return {}
        if model is not self.raw_model:
            model = model.to(self.env.device)
        out = self._long_context(model, step) if context_due else {}
        return out | (self.tasks.run(model, step) if tasks_due else {})

    def _long_context(self, model, step: int) -> dict:
        t0 = time.perf_counter()
        devices = [self.env.device] if self.env.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the training RNG is untouched, whatever runs inside
            out = long_context_metrics(model, self.windows, self.tokenizer, self.le, self.train_len)
        logger.info(f"long-context eval after step {step - 1}: " + ", ".join(
            f"{k[4:]} {v:.4g}" for k, v in out.items()) + f" ({time.perf_counter() - t0:.1f} s)")
        return out
