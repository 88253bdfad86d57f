"""Passkey retrieval (Landmark Attention / YaRN template, rope.md §3.2) over a length x depth grid.

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. ...
    {garbage prefix} The pass key is {K}. Remember it. {K} is the pass key. {garbage suffix}
    What is the pass key? The pass key is

Every sample is seeded by (seed, length, depth, index), so a grid is reproducible bit for bit. The
key sentence starts at `depth` x (the garbage budget) tokens into the filler: depth 0 puts it right
after the instruction, depth 1 right before the question. Scoring:

- generate: greedy decoding with the KV cache for len(answer) + 2 tokens; the first integer in the
  decoded text must equal K (exact match);
- teacher: the prompt plus " K" in one pass; correct when every answer token is the argmax
  (works for tiny models that cannot be prompted; also reports the answer's mean log-probability).
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Optional, Sequence

import torch

from spindle.errors import SpindleError
from spindle.eval.generate import check_ids_in_vocab, generate, tokenizer_source
from spindle.eval.prefill import check_cache_memory, prefill_chunks
from spindle.model.llama import KVCache, Transformer

logger = logging.getLogger(__name__)

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the important information there.\n")
GARBAGE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY = "The pass key is {k}. Remember it. {k} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


def make_sample(tokenizer, length: int, depth: float, seed: int = 0, index: int = 0,
                key: Optional[int] = None) -> dict:
    """One prompt of exactly `length` tokens (when the filler allows) with the key at `depth` in [0, 1]."""
    if not 0.0 <= depth <= 1.0:
        raise SpindleError(f"passkey depth must be in [0, 1], got {depth}")
    rng = random.Random(f"passkey/{seed}/{length}/{depth:.6f}/{index}")
    k = rng.randint(1, 50000) if key is None else key
    enc = tokenizer.encode
    head = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + enc(INTRO)
    key_ids = enc(KEY.format(k=k))
    question = enc(QUESTION)
    budget = length - len(head) - len(key_ids) - len(question)
    if budget < 0:
        raise SpindleError(f"--lengths {length}: too short for the passkey template ({length - budget} tokens)")
    unit = enc(GARBAGE)
    filler = (unit * (budget // max(1, len(unit)) + 2))[:budget]
    cut = int(round(depth * budget))
    ids = head + filler[:cut] + key_ids + filler[cut:] + question
    return {"ids": ids, "key": k, "answer": enc(f" {k}"), "key_start": len(head) + cut, "length": len(ids),
            "depth": depth}


@torch.no_grad()
def score_sample(model: Transformer, tokenizer, sample: dict, mode: str = "generate", chunk: int = 1024) -> dict:
    device = next(model.parameters()).device
    check_ids_in_vocab(sample["ids"] + sample["answer"], model.args.vocab_size, tokenizer_source(tokenizer))
    if mode == "teacher":
        inp = torch.tensor([sample["ids"] + sample["answer"][:-1]], device=device)
        n, a = inp.shape[1], len(sample["answer"])
        pieces = []  # the logits that predict the answer: the last a positions, possibly across chunks
        for s, logits in prefill_chunks(model, inp, KVCache(), chunk):
            lo = max(n - a - s, 0)
            if lo < logits.shape[1]:
                pieces.append(logits[:, lo:])
        ans_logits = torch.cat(pieces, 1)[0].float()
        target = torch.tensor(sample["answer"], device=device)
        ok = bool((ans_logits.argmax(-1) == target).all())
        logp = float(ans_logits.log_softmax(-1).gather(-1, target[:, None]).mean())
        return {"correct": ok, "logp": logp, "output": None}
    out = generate(model, [sample["ids"]], len(sample["answer"]) + 2, eos_id=tokenizer.eos_id, chunk=chunk)[0]
    text = tokenizer.decode(out)
    m = re.search(r"\d+", text)
    return {"correct": bool(m and int(m.group()) == sample["key"]), "logp": None, "output": text}


@torch.no_grad()
def passkey_grid(model: Transformer, tokenizer, lengths: Sequence[int], depths: Sequence[float], samples: int,
                 spec: str, train_len: int, seed: int = 0, mode: str = "generate", chunk: int = 1024,
                 show_rows: bool = False) -> dict:
    """One RoPE variant over the (length x depth) grid: accuracy per cell, and in teacher mode the answer's
    mean log-probability per cell. The model's own rotary module is put back afterwards. `show_rows` logs each
    length's row as it is done (the progress of `spindle eval passkey`; training's long_eval keeps quiet)."""
    from spindle.eval.perplexity import parse_variant, set_rope, variant_scaling

    v = parse_variant(spec, train_len)
    acc = [[0.0] * len(depths) for _ in lengths]
    logps: list[list[Optional[float]]] = [[None] * len(depths) for _ in lengths]
    original = model.rotary
    try:
        for i, L in enumerate(lengths):
            set_rope(model, variant_scaling(v, L, train_len), train_len if v.logn else None)
            for j, d in enumerate(depths):
                scores = [score_sample(model, tokenizer, make_sample(tokenizer, L, d, seed, n), mode, chunk)
                          for n in range(samples)]
                acc[i][j] = sum(s["correct"] for s in scores) / samples
                if mode == "teacher":
                    logps[i][j] = sum(s["logp"] for s in scores) / samples
            if show_rows:
                logger.info(f"  passkey {spec} L={L}: " + " ".join(f"{a:.2f}" for a in acc[i]))
    finally:
        model.rotary = original
    return {"accuracy": acc, "answer_logp": logps if mode == "teacher" else None,
            "mean": sum(map(sum, acc)) / (len(lengths) * len(depths))}


def run_passkey(ckpt: str, lengths: Optional[Sequence[int]], depths: Sequence[float], samples: int = 5,
                variants: Sequence[str] = ("plain",), seed: int = 0, mode: str = "generate", chunk: int = 1024,
                tokenizer: Optional[str] = None, train_len: Optional[int] = None, device: str = "cpu") -> dict:
    from spindle.data.tokenizer import load_tokenizer
    from spindle.eval.load import load_model_for_eval
    from spindle.eval.perplexity import default_lengths

    model, cfg = load_model_for_eval(ckpt, device=device)
    T = train_len or cfg.data.seq_len
    lengths = sorted(set(lengths or default_lengths(T, 16)))
    check_cache_memory(model, lengths[-1])
    tok = load_tokenizer(tokenizer or cfg.data.tokenizer_path or "default")
    make_sample(tok, lengths[0], 0.0)  # the shortest length must hold the template: fail before any work
    res = {"ckpt": str(ckpt), "train_len": T, "lengths": lengths, "depths": list(depths), "samples": samples,
           "seed": seed, "mode": mode, "variants": {}}
    for spec in variants:
        res["variants"][spec] = passkey_grid(model, tok, lengths, depths, samples, spec, T, seed, mode, chunk,
                                             show_rows=True)
    return res


def format_passkey_table(res: dict) -> str:
    """Accuracy per length (rows) and depth (columns), one block per variant."""
    head = f"{'length':>8}" + "".join(f"{d:>8g}" for d in res["depths"])
    lines = [f"passkey accuracy ({res['mode']}, {res['samples']} samples per cell); columns: key depth"]
    for name, r in res["variants"].items():
        lines += [f"{name} (mean {r['mean']:.2f})", head]
        lines += [f"{L:>8}" + "".join(f"{a:>8.2f}" for a in row) for L, row in zip(res["lengths"], r["accuracy"])]
    return "\n".join(lines)


def plot_passkey(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["variants"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names) + 1, 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        acc = res["variants"][name]["accuracy"]
        im = ax.imshow([list(r) for r in zip(*acc)], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(res["lengths"])), [str(L) for L in res["lengths"]], rotation=45, fontsize=7)
        ax.set_yticks(range(len(res["depths"])), [f"{d:g}" for d in res["depths"]])
        ax.set_xlabel("length (tokens)")
        ax.set_ylabel("key depth")
        ax.set_title(f"{name}: mean {res['variants'][name]['mean']:.2f}")
        for i in range(len(res["lengths"])):
            for j in range(len(res["depths"])):
                ax.text(i, j, f"{acc[i][j]:.1f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.suptitle(f"passkey retrieval ({res['mode']}, {res['samples']} samples per cell, train len {res['train_len']})")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


__all__ = ["make_sample", "score_sample", "passkey_grid", "run_passkey", "plot_passkey", "format_passkey_table"]
