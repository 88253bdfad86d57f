"""Training tokenizers: `spindle tokenizer train` (sentencepiece BPE with byte fallback, or
Hugging Face byte-level BPE), into a folder that `load_tokenizer` reads back."""

from __future__ import annotations

import json
import os
from typing import Sequence

from spindle.data.tokenizer import BYTE_TOKENIZER_FILE, Tokenizer, load_tokenizer
from spindle.errors import SpindleError

# What a tokenizer folder holds; `spindle tokenizer train --overwrite` replaces these (and only these).
TOKENIZER_FILES = {"tokenizer.model", "tokenizer.vocab", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja", BYTE_TOKENIZER_FILE}


MIN_VOCAB, MAX_VOCAB = 300, 1 << 24


def check_vocab_size(vocab_size, option: str) -> int:
    """A vocabulary size sentencepiece and tokenizers can train: checked before calling them
    (sentencepiece takes an int32 and aborts the process on some values)."""
    if type(vocab_size) is not int or not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise SpindleError(f"{option}: expected an integer in [{MIN_VOCAB}, {MAX_VOCAB}] (byte fallback + specials "
                           f"need {MIN_VOCAB}), got {vocab_size!r}")
    return vocab_size


def train_tokenizer(
    files: Sequence[str | os.PathLike],
    vocab_size: int,
    out_dir: str | os.PathLike,
    kind: str = "sentencepiece",
    num_threads: int | None = None,
    overwrite: bool = False,
) -> Tokenizer:
    """Train a tokenizer on text files into `out_dir` (see `_train_into`). An existing non-empty
    `out_dir` is refused without `overwrite`, and so is one that holds an input; the files are
    written next to it and moved in when training succeeded."""
    from spindle.outputs import StagedFolder, check_output

    files = [str(f) for f in files]
    if not files:
        raise SpindleError("train_tokenizer: no input files")
    for f in files:
        if not os.path.isfile(f) or not os.access(f, os.R_OK):
            raise SpindleError(f"{f}: training file not found or not readable")
    if kind not in ("sentencepiece", "bpe"):
        raise SpindleError(f"unknown tokenizer kind {kind!r} (expected 'sentencepiece' or 'bpe')")
    check_vocab_size(vocab_size, "--vocab-size")
    check_output(str(out_dir), files, overwrite, "--out")
    with StagedFolder(str(out_dir), replaces=TOKENIZER_FILES.__contains__, overwrite=overwrite, option="--out",
                      command="spindle tokenizer train") as staging:
        _train_into(files, vocab_size, staging, kind, num_threads)
    return load_tokenizer(out_dir)


def _train_into(files: list[str], vocab_size: int, out_dir: str, kind: str, num_threads: int | None) -> None:
    """Train a tokenizer on text files (one sentence per line for sentencepiece) into `out_dir`.

    sentencepiece: BPE with byte fallback, identity normalisation and no dummy prefix, so any
    text (code indentation, newlines via byte pieces) round-trips through encode/decode exactly.
    bpe: Hugging Face byte-level BPE with <s>, </s>, <pad> specials.
    """
    threads = num_threads or os.cpu_count() or 1
    if kind == "sentencepiece":
        import sentencepiece as spm

        try:
            spm.SentencePieceTrainer.train(
                input=files,
                model_prefix=os.path.join(str(out_dir), "tokenizer"),
                vocab_size=vocab_size,
                model_type="bpe",
                byte_fallback=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                # No implicit leading space: encode(a) + encode(b) decodes to a + b exactly,
                # which SFT prompt/answer segments and code rely on.
                add_dummy_prefix=False,
                allow_whitespace_only_pieces=True,
                split_digits=True,
                character_coverage=0.9995,
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=3,
                num_threads=threads,
                max_sentence_length=1 << 16,
                input_sentence_size=2_000_000,
                shuffle_input_sentence=True,
                minloglevel=2,
            )
        except (RuntimeError, ValueError) as e:
            raise SpindleError(f"sentencepiece training failed on {', '.join(files)}: {e}") from None
        return
    if kind == "bpe":
        from tokenizers import Tokenizer as _HFTok, decoders, models, pre_tokenizers, trainers

        tok = _HFTok(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        try:
            tok.train(files, trainer)
        except Exception as e:
            raise SpindleError(f"BPE training failed on {', '.join(files)}: {e}") from None
        path = os.path.join(str(out_dir), "tokenizer.json")
        tok.save(path)
        with open(os.path.join(str(out_dir), "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, f)
