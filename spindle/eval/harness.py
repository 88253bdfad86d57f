"""Spindle checkpoints as an lm-evaluation-harness model: `--model spindle --model_args ckpt=runs/demo/ckpt`.

Any folder `spindle.eval.load` reads (a Spindle checkpoint of any layout, local or S3; a Hugging Face,
InternEvo or Meta Llama folder) is scored with the tokenizer its checkpoint records (else its config's) and
its own RoPE, or a variant named as `spindle eval ppl --variants` names them (`rope=dynamic`, `rope=yarn:4`,
`rope=ntk:8+logn`, ...). Requests are tokenized and scored the way lm-eval's `hf` backend scores a Hugging
Face model (BOS first where the tokenizer has one, right-padded batches, float32 log-softmax), so a checkpoint
and its `spindle convert to-hf` copy give the same per-sample log-likelihoods (tests/e2e/test_lm_eval.py).
Under torchrun every process is an lm-eval rank: the evaluator hands each one its share of the requests and
gathers the results, and every rank holds the whole model (no collectives inside a forward).

lm-eval 0.4.13, the newest release, finds models only in its own source tree: `lm_eval --model spindle`
works once this module is imported. `python -m spindle.eval.harness run --model spindle ...` imports it and
runs lm-eval's own command line; `spindle eval tasks` is the short form (docs/evaluation.md).
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Optional

import torch
import torch.nn.functional as F

from spindle.errors import SpindleError
from spindle.extras import require

LM_EVAL = "the lm-evaluation-harness model (spindle eval tasks, lm_eval --model spindle)"
TemplateLM = require("lm_eval.api.model", "eval", LM_EVAL).TemplateLM
register_model = require("lm_eval.api.registry", "eval", LM_EVAL).register_model
get_rolling_token_windows = require("lm_eval.utils", "eval", LM_EVAL).get_rolling_token_windows
make_disjoint_window = require("lm_eval.utils", "eval", LM_EVAL).make_disjoint_window

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_ARGS = ("ckpt", "rope", "max_length", "train_len", "batch_size", "max_batch_size", "device", "dtype",
              "tokenizer", "max_gen_toks")


def _positive_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit() or int(value) < 1:
        raise SpindleError(f"--model_args {key}={value!r}: expected a whole number >= 1")
    return int(value)


def _device(requested: Optional[str], local_rank: int) -> torch.device:
    """The device of this rank: as asked, else CUDA (this rank's GPU under torchrun) where there is one."""
    if requested is None:
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(str(requested))
    except (RuntimeError, ValueError):
        raise SpindleError(f"device {requested!r}: expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise SpindleError(f"device {requested!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpindleError(f"device {requested}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def _join_launch(device: torch.device) -> tuple[int, int]:
    """(rank, world size) of this process: torchrun's, with a process group for lm-eval's gathers."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
    return dist.get_rank(), dist.get_world_size()


class SpindleLM(TemplateLM):
    """model_args: ckpt (required), rope (a `spindle eval ppl` variant: plain, dynamic, yarn, yarn:F, ntk:F,
    linear:F, llama3:F, logn, joined by '+'), max_length (tokens a forward sees; default the training length),
    train_len (the length variants scale from; default the checkpoint's data.seq_len), batch_size, device
    (cpu, cuda, cuda:N), dtype (float32, bfloat16, float16), tokenizer (a `load_tokenizer` spec), max_gen_toks."""

    def __init__(self, ckpt: Optional[str] = None, rope: Optional[str] = None, max_length=None, train_len=None,
                 batch_size=1, max_batch_size=None, device: Optional[str] = None, dtype: str = "float32",
                 tokenizer: Optional[str] = None, max_gen_toks=256, **unknown):
        super().__init__()
        from spindle.data.tokenizer import load_tokenizer
        from spindle.eval.load import checkpoint_tokenizer, load_model_for_eval
        from spindle.eval.perplexity import parse_variant, set_rope, variant_scaling

        if unknown:
            raise SpindleError(f"--model_args {sorted(unknown)[0]}: not an argument of the spindle model "
                               f"(expected {', '.join(MODEL_ARGS)})")
        if not ckpt:
            raise SpindleError("--model_args: expected ckpt=<checkpoint or model folder>")
        if dtype not in DTYPES:
            raise SpindleError(f"--model_args dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
        if str(batch_size).startswith("auto"):
            raise SpindleError(f"batch_size {batch_size!r}: the spindle model takes a number of requests per forward")
        if rope is not None:
            parse_variant(str(rope), 1)  # a bad variant is refused before the model is read
        self._batch_size = _positive_int(batch_size, "batch_size")
        self._max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        self._device = _device(device, int(os.environ.get("LOCAL_RANK", "0")))
        self._rank, self._world_size = _join_launch(self._device)
        model, cfg = load_model_for_eval(str(ckpt), device=str(self._device))
        self.train_len = _positive_int(train_len, "train_len") if train_len is not None else cfg.data.seq_len
        self._max_length = _positive_int(max_length, "max_length") if max_length is not None else self.train_len
        variant = parse_variant(str(rope), self.train_len) if rope is not None else None
        if variant is not None and (variant.scaling or variant.per_length_yarn or variant.logn):
            # as `spindle eval ppl` applies a variant; a bare `yarn` stretches train_len to max_length
            set_rope(model, variant_scaling(variant, self._max_length, self.train_len),
                     self.train_len if variant.logn else None)
        self.model = model.to(DTYPES[dtype])
        # Dynamic NTK (and longrope) rotate by the length of the input: see _groups
        self.length_dependent_rope = model.rotary.varies_with_length
        self.tokenizer = load_tokenizer(tokenizer or checkpoint_tokenizer(str(ckpt)) or cfg.data.tokenizer_path
                                        or "default")
        self.vocab_size = model.args.vocab_size

    # ------------------------------------------------------------------ what lm-eval asks of a model

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is scored after: BOS, as training starts every document with it."""
        bos = self.tokenizer.bos_id
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.path or self.tokenizer.kind).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len=None,
                   **kwargs) -> list[int]:
        """BOS (where the tokenizer has one) + the text's ids, as a Hugging Face Llama tokenizer encodes;
        add_special_tokens=False leaves BOS out."""
        ids = self.tokenizer.encode(string)
        if self.tokenizer.bos_id is not None and add_special_tokens is not False:
            ids = [self.tokenizer.bos_id] + ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode([ids] if isinstance(ids, int) else list(ids))

    # ------------------------------------------------------------------ scoring

    def _groups(self, lengths: list[int]) -> list[list[int]]:
        """Request indices, longest first, in batches of batch_size; with RoPE that depends on the length of
        the input (Dynamic NTK) only inputs of one length share a batch, so padding never changes a score."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        groups: list[list[int]] = []
        for i in order:
            last = groups[-1] if groups else None
            if (last is None or len(last) == self.batch_size
                    or (self.length_dependent_rope and lengths[last[0]] != lengths[i])):
                groups.append([i])
            else:
                last.append(i)
        return groups

    def _check_ids(self, ids: torch.Tensor) -> None:
        from spindle.eval.generate import check_ids_in_vocab, tokenizer_source

        check_ids_in_vocab(ids, self.vocab_size, tokenizer_source(self.tokenizer))

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(key, context ids, continuation ids) -> (sum of the continuation's log-probabilities, whether each
        continuation token is the argmax). The input is the last max_length tokens of context + continuation
        but its final one, as lm-eval's hf backend cuts it."""
        inputs, conts = [], []
        for _, context, continuation in requests:
            if not continuation or len(continuation) > self.max_length:
                raise SpindleError(f"a continuation of {len(continuation)} tokens: expected 1 .. max_length "
                                   f"({self.max_length})")
            inputs.append((list(context) + list(continuation))[-(self.max_length + 1):][:-1])
            conts.append(list(continuation))
        results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        for group in self._groups([len(x) for x in inputs]):
            width = len(inputs[group[0]])
            batch = torch.full((len(group), width), self.tokenizer.pad_id, dtype=torch.long)
            for row, i in enumerate(group):
                batch[row, : len(inputs[i])] = torch.tensor(inputs[i])
            self._check_ids(batch)
            logprobs = F.log_softmax(self.model(batch.to(self.device)).float(), dim=-1)
            for row, i in enumerate(group):
                n, end = len(conts[i]), len(inputs[i])
                target = torch.tensor(conts[i], device=self.device)
                rows = logprobs[row, end - n: end]
                answer = (float(rows.gather(-1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all()))
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, in disjoint windows of max_length tokens (each after the
        previous window's last token; the first after BOS), summed."""
        windows, owner = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[index] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample and a temperature) continuations, each cut before the first
        `until` string; requests with the same options and context length are generated together."""
        from spindle.eval.generate import generate_stream

        plans = [self._generation_plan(*req.args) for req in requests]
        out: list[Optional[str]] = [None] * len(requests)
        keys = sorted({(p[1], len(p[0])) for p in plans})
        for key in keys:
            members = [i for i, p in enumerate(plans) if (p[1], len(p[0])) == key]
            for start in range(0, len(members), self.batch_size):
                group = members[start: start + self.batch_size]
                max_new, temperature, top_k, top_p, seed = plans[group[0]][1][:5]
                until = plans[group[0]][2]
                ids = [plans[i][0] for i in group]
                self._check_ids(torch.tensor(ids))
                produced: list[list[int]] = [[] for _ in group]
                done = [False] * len(group)
                for nxt in generate_stream(self.model, ids, max_new, temperature, top_k, top_p,
                                           eos_id=self.eot_token_id, seed=seed,
                                           vocab_limit=self.tokenizer.vocab_size):
                    for row, token in enumerate(nxt.tolist()):
                        if done[row]:
                            continue
                        if token == self.eot_token_id:
                            done[row] = True
                            continue
                        produced[row].append(token)
                        done[row] = any(s in self.tok_decode(produced[row]) for s in until)
                    if all(done):
                        break
                for row, i in enumerate(group):
                    text = self.tok_decode(produced[row])
                    for stop in until:
                        text = text.split(stop)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _generation_plan(self, context: str, gen_kwargs: dict) -> tuple[list[int], tuple, tuple[str, ...]]:
        """(context ids, (max new tokens, temperature, top_k, top_p, seed), until strings) of one request."""
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or []
        until = tuple(s for s in ([until] if isinstance(until, str) else until) if s)
        max_new = _positive_int(kwargs.pop("max_gen_toks", self.max_gen_toks), "max_gen_toks")
        # as transformers' generate: greedy unless do_sample, which samples at temperature 1 unless given one
        sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0) or 0.0) if sample else 0.0
        options = (max_new, temperature, int(kwargs.pop("top_k", 0) or 0), float(kwargs.pop("top_p", 1.0) or 1.0),
                   int(kwargs.pop("seed", 0) or 0))
        if max_new >= self.max_length:
            raise SpindleError(f"max_gen_toks {max_new}: expected fewer than max_length ({self.max_length})")
        ids = self.tok_encode(context, left_truncate_len=self.max_length - max_new)
        return ids or [self.prefix_token_id], options, until  # an empty context without BOS: start after EOS

    # ------------------------------------------------------------------ data-parallel ranks

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        import torch.distributed as dist

        from spindle.parallel.comm import comm_device

        parts = [torch.zeros_like(tensor, device=comm_device()) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        gathered = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, gathered, dst=dst)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m spindle.eval.harness run --model spindle --model_args ckpt=... --tasks ...`: lm-eval's own
    command line, with the spindle model registered. Bad model_args are one line (exit code 2), as in `spindle`."""
    cli_evaluate = require("lm_eval.__main__", "eval", LM_EVAL).cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except SpindleError as exc:
        print(f"spindle: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    # run as a script this file is `__main__`: the registered class must be the one of spindle.eval.harness,
    # which `spindle eval tasks` and lm-eval's lazy lookups import, or the two would collide in the registry
    from spindle.eval.harness import main as registered_main

    sys.exit(registered_main())
else:
    # lm-eval fills its registry with its own backends only while the registry is empty: list them first,
    # or registering this one would hide `hf`, `vllm`, ... from the same process
    require("lm_eval.models", "eval", LM_EVAL)

    register_model("spindle")(SpindleLM)
