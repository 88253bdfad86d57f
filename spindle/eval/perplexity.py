"""Long-context language-modelling evaluation: per-position loss and perplexity per length.

One pass per document window with the KV cache (chunked prefill, `spindle.eval.prefill`): the window is
fed `chunk` tokens at a time, each chunk attends causally to itself and fully to the cached keys, so
memory grows linearly with the length T (the cache is (B, Hkv, T, D) per layer; no mask or score
matrix over T is ever formed).
The loss of every position comes out of that one pass; because attention is causal it is the loss
"with context t" (rope.md §3.1, protocol 3).

RoPE variants are evaluated without retraining by swapping the model's rotary module:

    plain        the checkpoint's own RoPE (fixed base)
    dynamic      Dynamic NTK (factor 1, original length = training length)      one pass per length
    yarn         YaRN with factor L / T_train for each evaluation length L        one pass per length
    yarn:F ntk:F linear:F   fixed-factor scalings                                 one pass in all
    logn         log-scaled attention, q *= max(1, log_{T_train}(t + 1))
    a+b          combinations, e.g. dynamic+logn

Variants whose RoPE depends on the total length (dynamic, yarn without a factor) get one pass per
evaluation length L on the first L tokens of every window, with seq_len = L for every chunk, so all
positions of that pass share one base. Fixed variants get a single pass at the longest length; their
"truncated" perplexity at L is the mean over the first L positions, which is the same number a
separate pass at L would give.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from spindle.config.rope_types import Variant, parse_variant  # noqa: F401 (the variant syntax: one registry)
from spindle.data.loader import text_split
from spindle.errors import SpindleError
from spindle.eval.generate import check_ids_in_vocab, tokenizer_source
from spindle.eval.prefill import check_cache_memory, prefill_chunks
from spindle.model.llama import KVCache, Transformer
from spindle.model.rotary import RotaryEmbedding

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- per-position loss


@torch.no_grad()
def token_losses(model: Transformer, ids: torch.Tensor, chunk: int = 1024,
                 seq_len: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, L) -> (nll (B, L-1) fp32, correct (B, L-1) bool) via chunked prefill with a KV cache.

    Entry t is the loss of predicting ids[:, t+1] from ids[:, :t+1]. `seq_len` is the total context
    that length-dependent RoPE (Dynamic NTK) scales for; default L, the same for every chunk.
    """
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise SpindleError("token_losses needs ids of shape (B, L) with L >= 2")
    model.eval()
    inputs, labels = ids[:, :-1], ids[:, 1:]
    nll, correct = [], []
    for s, logits in prefill_chunks(model, inputs, KVCache(), chunk, ids.shape[1] if seq_len is None else seq_len):
        logits = logits.float()
        lab = labels[:, s : s + logits.shape[1]]
        nll.append(F.cross_entropy(logits.transpose(1, 2), lab, reduction="none"))
        correct.append(logits.argmax(-1) == lab)
        del logits
    return torch.cat(nll, 1), torch.cat(correct, 1)


def bucket_edges(max_len: int, train_len: int, per_octave: int = 2, start: int = 16) -> list[int]:
    """Geometric bucket edges over query positions: 0, start, ..., train_len, ..., max_len (per_octave per 2x)."""
    edges = {0, max_len}
    e = float(start)
    while e < max_len:
        edges.add(int(round(e)))
        e *= 2 ** (1 / per_octave)
    k = train_len
    while k < max_len:  # the training length and its powers of two are always edges
        edges.add(k)
        k *= 2
    return sorted(x for x in edges if x <= max_len)


def bucket_means(values: torch.Tensor, edges: Sequence[int]) -> list[Optional[float]]:
    """values (N, P) summed over rows, averaged per bucket [edges[i], edges[i+1]) of positions."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        seg = values[:, lo:hi]
        out.append(float(seg.double().mean()) if seg.numel() else None)
    return out


# --------------------------------------------------------------------------- variants


def set_rope(model: Transformer, scaling: Optional[dict], logn_ref_len: Optional[int]) -> Transformer:
    """Give `model` a new rotary module (new scaling / log-n), built as Transformer.__init__ builds it."""
    cfg = model.args
    if scaling is None:
        scaling = cfg.rope_scaling
    dev = next(model.parameters()).device
    with torch.device(dev):
        model.rotary = RotaryEmbedding(head_dim=cfg.head_dim, base=cfg.rope_base, scaling=scaling,
                                       max_position_embeddings=cfg.max_position_embeddings,
                                       logn_ref_len=logn_ref_len)
    return model


def variant_scaling(v: Variant, length: int, train_len: int) -> Optional[dict]:
    if v.per_length_yarn:
        f = max(1.0, length / train_len)
        return {"type": "yarn", "factor": f, "original_max_position_embeddings": train_len} if f > 1 else None
    return v.scaling


# --------------------------------------------------------------------------- data


READ_AHEAD = 8  # how much more than the windows need is read, looking for whole documents that long


def load_token_docs(paths: Sequence[str], tokenizer, glob: str = "*",
                    enough: Optional[tuple[int, int]] = None, option: str = "--data",
                    vocab: Optional[int] = None) -> list[list[int]]:
    """Documents from text files / folders (one document per file, BOS first) or token shard folders.
    `vocab`: the model's vocabulary, which every id read must fit (one line naming the file or tokenizer).

    `enough` = (n, length): stop reading once n documents hold at least `length` tokens each, or once
    READ_AHEAD x n x length tokens are read and the shorter documents can fill the remaining windows
    (`make_windows` cuts them from those), so a large folder is not read whole for a few windows."""
    from spindle.data.shards import find_token_files, open_documents

    docs: list[list[int]] = []
    long_docs = short_tokens = read = 0

    def add(ids: list[int]) -> bool:
        nonlocal long_docs, short_tokens, read
        docs.append(ids)
        if enough is None:
            return False
        n, length = enough
        read += len(ids)
        if len(ids) >= length:
            long_docs += 1
        else:
            short_tokens += len(ids)
        return long_docs >= n or (read >= READ_AHEAD * n * length and short_tokens >= (n - long_docs) * length)

    for p in map(Path, paths):
        if not p.exists():
            raise SpindleError(f"{option} {p}: not found")
        token_files = find_token_files(str(p)) if p.is_dir() else (
            [str(p)] if p.suffix in (".bin", ".npy") else [])
        if token_files:
            for f in token_files:
                src = open_documents(f)
                for i in range(len(src)):
                    ids = src[i][0]
                    if vocab is not None:
                        check_ids_in_vocab(ids, vocab, f"{option} {f} (token file)",
                                           "it was tokenized with another tokenizer than the checkpoint's: "
                                           "prepare the data again with the checkpoint's tokenizer")
                    if add(ids.astype("int64").tolist()):
                        return docs
            continue
        files = sorted(x for x in p.rglob(glob) if x.is_file()) if p.is_dir() else [p]
        for f in files:
            ids = tokenizer.encode(f.read_text(encoding="utf-8", errors="replace"))
            if vocab is not None:
                check_ids_in_vocab(ids, vocab, tokenizer_source(tokenizer))
            if add(([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + ids):
                return docs
    if not docs:
        raise SpindleError(f"{option} {list(map(str, paths))}: no documents")
    return docs


def checkpoint_data(cfg, option: str = "--data", whose: str = "the checkpoint's") -> tuple[list[str], str]:
    """What `eval ppl` reads without --data (and long_eval without long_eval.data): the config's validation
    folder; for a text folder with data.text_valid_bytes, its held-out files; else the files training read
    (data.text_glob / text_exclude / max_text_bytes). Returns (paths, a line saying what was chosen)."""
    data = cfg.data
    if data.valid_folder:
        return [data.valid_folder], f"data.valid_folder {data.valid_folder}"
    if not data.train_folder:
        raise SpindleError(f"{option} is required: {whose} config names no data folder "
                           "(data.train_folder is None: it trained on random tokens)")
    root = Path(data.train_folder)
    if not root.is_dir():
        raise SpindleError(f"{option} is required: {whose} data.train_folder {root} is not on this machine")
    if data.type != "text":
        return [str(root)], f"data.train_folder {root} (training data: pass {option} for held-out text)"
    try:
        files, held = text_split(data)
    except SpindleError as exc:
        raise SpindleError(f"{option} is required: {exc}") from None
    if held:
        return held, (f"the {len(held)} held-out files of data.train_folder {root} (data.text_valid_bytes: "
                      "never trained on)")
    return files, (f"{len(files)} files of data.train_folder {root} ({data.text_glob!r}; the training data: "
                   f"pass {option} for held-out text)")


WINDOW_MODES = {
    "starts": "the first L tokens of each document at least L long, in order",
    "documents": "consecutive L-token pieces of every document, spread evenly over the data",
}


def make_windows(docs: Sequence[Sequence[int]], length: int, n: int, mode: str = "starts") -> tuple[torch.Tensor, int]:
    """n windows of `length` tokens. `starts`: the starts of documents at least that long, in order.
    `documents`: every document cut into consecutive windows from its start (what validation packs, in
    rows of the training length), n of them taken evenly spread. Either way, when there are too few, the
    shorter documents (`documents`: the documents' remainders) are concatenated and cut. Returns (windows
    (<= n, length), how many came from inside single documents)."""
    if mode == "starts":
        inside = [list(d[:length]) for d in docs if len(d) >= length][:n]
        rest = [d for d in docs if len(d) < length]
    else:
        inside = [list(d[s : s + length]) for d in docs for s in range(0, len(d) - length + 1, length)]
        rest = [d[len(d) - len(d) % length:] for d in docs if len(d) % length]
    natural = len(inside)
    wins = inside
    if len(wins) < n:
        stream = [t for d in rest for t in d]
        wins = wins + [stream[s : s + length] for s in range(0, len(stream) - length + 1, length)]
    if not wins:
        raise SpindleError(f"the evaluation data holds fewer than {length} tokens")
    if len(wins) > n:  # an even spread over the data, its first and last window included
        picks = sorted({round(i * (len(wins) - 1) / max(n - 1, 1)) for i in range(n)})
        natural = sum(1 for i in picks if i < natural)
        wins = [wins[i] for i in picks]
    return torch.tensor(wins, dtype=torch.long), min(natural, len(wins))


def windows_line(mode: str, got: int, asked: int, natural: int, length: int) -> str:
    """How the windows were chosen, and, when the data holds fewer than asked, that it does."""
    line = f"{got} windows of {length} tokens, --windows-from {mode} ({WINDOW_MODES[mode]}; {natural} from inside " \
           "single documents, the rest cut from shorter documents joined)"
    if got < asked:
        line += f"; --windows {asked}: the data holds only {got}" + \
            (" (--windows-from documents cuts more from the same data)" if mode == "starts" else "")
    return line


# --------------------------------------------------------------------------- evaluation


def evaluate_variant(model: Transformer, windows: torch.Tensor, lengths: Sequence[int], train_len: int,
                     variant: Variant, chunk: int = 1024, batch: int = 1, per_octave: int = 4) -> dict:
    """Per-length truncated NLL/perplexity/accuracy, tail-bucket NLL ([L/2, L)) and a per-position curve."""
    lengths = sorted(lengths)
    max_len = lengths[-1]
    logn = train_len if variant.logn else None
    out: dict = {"spec": variant.name, "per_length": variant.per_length, "length": {}}
    original_rotary = model.rotary

    def run(length: int, scaling) -> tuple[torch.Tensor, torch.Tensor]:
        set_rope(model, scaling, logn)
        nl, ac = [], []
        for i in range(0, windows.shape[0], batch):
            n, c = token_losses(model, windows[i : i + batch, :length], chunk, seq_len=length)
            nl.append(n)
            ac.append(c)
        return torch.cat(nl), torch.cat(ac)

    t0 = time.perf_counter()
    passes = [(L, variant_scaling(variant, L, train_len)) for L in lengths] if variant.per_length else \
        [(max_len, variant.scaling)]
    nll = acc = None
    for L, scaling in passes:
        nll, acc = run(L, scaling)
        targets = [L] if variant.per_length else lengths
        for T in targets:
            n = nll[:, : T - 1]
            a = acc[:, : T - 1]
            tail = slice(max(0, T // 2 - 1), T - 1)
            mean = float(n.double().mean())
            out["length"][str(T)] = {"nll": mean, "ppl": math.exp(min(mean, 50.0)),
                                     "acc": float(a.double().mean()),
                                     "tail_nll": float(nll[:, tail].double().mean()),
                                     "tail_acc": float(acc[:, tail].double().mean())}
    # the per-position curve from the longest pass (for per-length variants: the base used at max_len)
    edges = bucket_edges(nll.shape[1], train_len, per_octave)
    out["curve"] = {"edges": edges, "nll": bucket_means(nll, edges), "acc": bucket_means(acc, edges)}
    out["seconds"] = round(time.perf_counter() - t0, 2)
    model.rotary = original_rotary
    return out


def variant_line(out: dict, lengths: Sequence[int]) -> str:
    """'  yarn: 256: 4.1, 1024: 5.3  (12 s)': one variant's perplexities, as `spindle eval ppl` goes."""
    return (f"  {out['spec']}: " + ", ".join(f"{L}: {out['length'][str(L)]['ppl']:.3g}" for L in sorted(lengths))
            + f"  ({out['seconds']:.0f} s)")


def default_lengths(train_len: int, factor: int = 64) -> list[int]:
    out, L = [], train_len
    while L <= train_len * factor:
        out.append(L)
        L *= 2
    return out


def plot_ppl(result: dict, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    T = result["train_len"]
    for name, r in result["variants"].items():
        if r["per_length"]:
            Ls = sorted(int(k) for k in r["length"])
            xs = [math.sqrt(max(L / 2, 1) * L) for L in Ls]
            ax1.plot(xs, [r["length"][str(L)]["tail_nll"] for L in Ls], "o--", label=f"{name} (tail [L/2,L), per L)")
        else:
            c = r["curve"]
            mids = [math.sqrt(max(lo, 1) * hi) for lo, hi in zip(c["edges"][:-1], c["edges"][1:])]
            ax1.plot(mids, c["nll"], "-", label=name)
        Ls = sorted(int(k) for k in r["length"])
        ax2.plot(Ls, [r["length"][str(L)]["ppl"] for L in Ls], "o-", label=name)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.axvline(T, color="grey", ls=":", lw=1)
        ax.grid(alpha=0.3)
    ax1.set_xlabel("position (tokens)")
    ax1.set_ylabel("NLL (nats/token)")
    ax1.set_title("loss vs position")
    ax2.set_yscale("log")
    ax2.set_xlabel("evaluation length L")
    ax2.set_ylabel("perplexity over the first L tokens")
    ax2.set_title("perplexity vs length")
    ax1.legend(fontsize=8)
    fig.suptitle(title or f"{result.get('ckpt', '')} (training length {T})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_ppl(ckpt: str, data: Optional[Sequence[str]], lengths: Optional[Sequence[int]] = None,
            variants: Sequence[str] = ("plain", "dynamic", "yarn", "logn"), windows: int = 8, chunk: int = 1024,
            batch: int = 1, tokenizer: Optional[str] = None, glob: str = "*", train_len: Optional[int] = None,
            device: str = "cpu", windows_from: str = "starts") -> dict:
    from spindle.data.tokenizer import load_tokenizer
    from spindle.eval.load import load_model_for_eval

    model, cfg = load_model_for_eval(ckpt, device=device)
    T = train_len or cfg.data.seq_len
    lengths = sorted(set(lengths or default_lengths(T)))
    check_cache_memory(model, lengths[-1], batch)
    tok = load_tokenizer(tokenizer or cfg.data.tokenizer_path or "default")
    # `documents` spreads its windows over all the data, so it reads all of it
    enough = (windows, lengths[-1]) if windows_from == "starts" else None
    if data is None:
        data, what = checkpoint_data(cfg)
        logger.info(f"eval ppl: no --data, reading {what}")
        docs = load_token_docs(data, tok, "*", enough=enough, option="the checkpoint's data",
                               vocab=model.args.vocab_size)
    else:
        docs = load_token_docs(data, tok, glob, enough=enough, vocab=model.args.vocab_size)
    wins, natural = make_windows(docs, lengths[-1], windows, windows_from)
    wins = wins.to(device)
    logger.info(f"eval ppl: {ckpt}: {windows_line(windows_from, wins.shape[0], windows, natural, lengths[-1])}; "
                f"training length {T}, chunk {chunk}")
    result = {"ckpt": str(ckpt), "train_len": T, "rope_base": cfg.model.rope_base, "lengths": lengths,
              "n_windows": int(wins.shape[0]), "natural_windows": natural, "windows_from": windows_from,
              "chunk": chunk,
              "protocol": "per-position NLL from one chunked-prefill pass per window (fixed RoPE) or per length "
                          "(dynamic / per-length YaRN); ppl at L = exp(mean NLL of positions < L); "
                          "tail = positions [L/2, L)",
              "variants": {}}
    for spec in variants:
        v = parse_variant(spec, T)
        result["variants"][spec] = evaluate_variant(model, wins, lengths, T, v, chunk, batch)
        logger.info(variant_line(result["variants"][spec], lengths))
    return result


# --------------------------------------------------------------------------- CLI


def format_table(res: dict) -> str:
    Ls = res["lengths"]
    lines = ["perplexity over the first L tokens", f"{'variant':<16}" + "".join(f"{L:>10}" for L in Ls)]
    for name, r in res["variants"].items():
        lines.append(f"{name:<16}" + "".join(f"{r['length'][str(L)]['ppl']:>10.3g}" for L in Ls))
    return "\n".join(lines)
