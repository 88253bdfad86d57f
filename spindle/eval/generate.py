"""Text generation with a KV cache: greedy, temperature, top-k, top-p, streaming, stop at EOS.

The prompt is consumed in chunks (`spindle.eval.prefill`) so memory grows linearly with its length,
then one token per forward. Positions are absolute, so RoPE scaling that depends on the context length
(Dynamic NTK) follows the context as it grows: each forward passes `seq_len` = tokens so far.
Keys already in the cache keep the rotation they were computed with, as transformers does.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Sequence

import torch

from spindle.errors import SpindleError
from spindle.eval.prefill import prefill
from spindle.model.llama import KVCache, Transformer

MAX_NEW_TOKENS = 1_000_000  # more is a typo: every new token is one forward through the whole cache


def validate_generate_options(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """The sampling options of `spindle generate`, checked before a model is loaded: SpindleError naming the
    option. Types come from argparse (int / float); this checks ranges."""
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise SpindleError(f"--max-new-tokens {max_new_tokens}: expected 1 .. {MAX_NEW_TOKENS:,}")
    if not math.isfinite(temperature) or temperature < 0:
        raise SpindleError(f"--temperature {temperature}: expected a finite number >= 0 (0 = greedy)")
    if top_k < 0:
        raise SpindleError(f"--top-k {top_k}: expected >= 0 (0 = no top-k cut)")
    if not 0 < top_p <= 1:
        raise SpindleError(f"--top-p {top_p}: expected 0 < p <= 1 (1 = no nucleus cut)")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_stream(
    model: Transformer,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: Optional[int] = None,
    seed: int = 0,
    chunk: int = 1024,
    vocab_limit: Optional[int] = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence, step by step. Prompts must have equal length; they are
    prefilled `chunk` tokens at a time. `vocab_limit`: ids from there on are never sampled (a vocabulary
    padded beyond the tokenizer's ids: those rows have no token to decode)."""
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    cache = KVCache()
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = prefill(model, ids, cache, chunk)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits = logits.clone()
            logits[:, vocab_limit:] = float("-inf")
        nxt = sample_next(logits, temperature, top_k, top_p, gen)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        yield nxt
        if eos_id is not None:
            done |= nxt == eos_id
            if bool(done.all()):
                return
        pos = torch.full((ids.shape[0], 1), cache.length, device=device)
        logits = model(nxt[:, None], pos, cache=cache, seq_len=cache.length + 1)[:, -1]


def generate(model: Transformer, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 64,
             on_token: Optional[Callable[[torch.Tensor], None]] = None, **kw) -> list[list[int]]:
    """Batch generation: the new tokens of each sequence (up to and excluding EOS).

    Prompts of different lengths are generated in groups of equal length (no padding, so every
    sequence sees exactly its own context); results come back in the order of `prompt_ids`.
    """
    lengths = {len(p) for p in prompt_ids}
    if len(lengths) > 1:
        outs_by_index: dict[int, list[int]] = {}
        for n in sorted(lengths):
            idx = [i for i, p in enumerate(prompt_ids) if len(p) == n]
            group = generate(model, [prompt_ids[i] for i in idx], max_new_tokens, on_token=on_token, **kw)
            outs_by_index.update(zip(idx, group))
        return [outs_by_index[i] for i in range(len(prompt_ids))]
    eos_id = kw.get("eos_id")
    outs: list[list[int]] = [[] for _ in prompt_ids]
    finished = [False] * len(prompt_ids)
    for nxt in generate_stream(model, prompt_ids, max_new_tokens, **kw):
        if on_token is not None:
            on_token(nxt)
        for i, t in enumerate(nxt.tolist()):
            if finished[i]:
                continue
            if eos_id is not None and t == eos_id:
                finished[i] = True
            else:
                outs[i].append(t)
    return outs


def tokenizer_source(tokenizer) -> str:
    """How a vocabulary error names a tokenizer: its file (or kind) and its size."""
    return f"the tokenizer {tokenizer.path or tokenizer.kind} (a vocabulary of {tokenizer.vocab_size:,})"


def check_ids_in_vocab(ids, vocab: int, source: str,
                       remedy: str = "the checkpoint was trained with another tokenizer: pass that one (--tokenizer)"
                       ) -> None:
    """Token ids a model is about to read (a list, a tensor or an array) must lie in 0 .. vocab - 1: past
    that the embedding fails with an IndexError traceback. One line naming `source` (where the ids came
    from, with its own size) and the model's vocabulary: the two figures a user compares."""
    if len(ids) == 0:
        return
    top, low = (int(ids.max()), int(ids.min())) if hasattr(ids, "max") else (max(ids), min(ids))  # tensor / array
    if 0 <= low and top < vocab:
        return
    bad = top if top >= vocab else low
    raise SpindleError(f"{source} gives token id {bad:,}, outside the checkpoint's vocabulary of {vocab:,} entries "
                       f"(ids 0 .. {vocab - 1:,}): {remedy}")


def complete_text(model: Transformer, tokenizer, prompt: str, max_new_tokens: int = 48, stream=None,
                  **kw) -> str:
    """Encode `prompt` (with BOS), generate, decode; `stream(text_piece)` receives text as it comes. Only ids
    the tokenizer has are sampled (`padded_vocab_note` says so when the model's vocabulary is larger)."""
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt) if tokenizer.bos_id is not None else tokenizer.encode(prompt)
    check_ids_in_vocab(ids, model.args.vocab_size, tokenizer_source(tokenizer))
    produced: list[int] = []
    shown = ""

    def on_token(nxt: torch.Tensor) -> None:
        nonlocal shown
        t = int(nxt[0])
        if t == tokenizer.eos_id:
            return
        produced.append(t)
        if stream is not None:
            text = tokenizer.decode(produced)
            stream(text[len(shown):])
            shown = text

    generate(model, [ids], max_new_tokens, on_token=on_token, eos_id=tokenizer.eos_id,
             vocab_limit=tokenizer.vocab_size, **kw)
    return tokenizer.decode(produced)


def padded_vocab_note(model: Transformer, tokenizer) -> Optional[str]:
    """The line that says ids beyond the tokenizer are not sampled, when the model has such ids."""
    vocab = model.args.vocab_size
    if tokenizer.vocab_size >= vocab:
        return None
    return (f"note: the model's vocabulary ({vocab:,}) is padded beyond {tokenizer_source(tokenizer)}: ids "
            f"{tokenizer.vocab_size:,} .. {vocab - 1:,} have no token and are never sampled")
