"""The run's tokenizer, written next to exported weights so the folder is complete on its own.

Which tokenizer: the one the checkpoint records (spindle.data.tokenizer_identity: the tokenizer that made
the training data, its file re-hashed), else `data.tokenizer_path` of its config, else the one `--tokenizer`
names; with none of those the export is refused, never given a default. A tokenizer with more ids than
the model's vocabulary is not written (a note says so; refused when `--tokenizer` names it).

- a Hugging Face tokenizer folder (it has tokenizer_config.json): its tokenizer files are copied as
  they are (tokenizer.json / tokenizer.model, tokenizer_config.json, special_tokens_map.json, the
  chat template, ...), so the export tokenizes exactly like the original;
- a bare sentencepiece model: tokenizer.model + a tokenizer_config.json naming LlamaTokenizer with
  its BOS / EOS / UNK pieces (BOS added, as our data tools add it);
- a bare tokenizer.json: copied, with a tokenizer_config.json naming PreTrainedTokenizerFast.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from spindle.errors import SpindleError

# what transformers reads from a tokenizer folder (copied when present)
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                      "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")


@dataclass
class TokenizerExport:
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    pad_id: Optional[int] = None
    notes: list[str] = field(default_factory=list)


def _hf_folder(spec: str) -> Optional[Path]:
    """The HF tokenizer folder `spec` is, or is a file of; None for a bare model file."""
    p = Path(spec).expanduser()
    folder = p if p.is_dir() else p.parent
    return folder if (folder / "tokenizer_config.json").is_file() else None


def write_tokenizer(spec: str, vocab_size: int, out: Path, why: str = "") -> TokenizerExport:
    """Write the tokenizer `spec` (chosen by spindle.data.tokenizer_identity.choose_export_tokenizer; `why`
    says how) into `out`."""
    from spindle.data.tokenizer import DEFAULT_TOKENIZER_PATH, SentencePieceTokenizer, load_tokenizer

    how = f" ({why})" if why else ""
    if spec == "none":  # asked for: a folder of weights alone (a model that never had a tokenizer)
        return TokenizerExport(notes=[f"tokenizer: none{how}: no tokenizer files written"])
    if spec == "byte":
        byte_level_tokenizer().save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}, indent=1))
        return TokenizerExport(256, 257, None, [f"tokenizer: byte{how}, written as a byte-level tokenizer.json"])
    tok = load_tokenizer(spec)
    if tok.vocab_size > vocab_size:
        too_many = f"{spec} has {tok.vocab_size} ids, more than the model's vocab_size {vocab_size}"
        if why == "--tokenizer":
            raise SpindleError(f"--tokenizer {too_many}: it cannot be the tokenizer this model was trained with")
        # a run on generated data names a tokenizer it never used: the weights go, said, without it
        return TokenizerExport(notes=[f"note: no tokenizer written: {too_many}"])
    result = TokenizerExport(tok.bos_id, tok.eos_id, tok.pad_id, [f"tokenizer: {spec}{how}"])
    if tok.vocab_size < vocab_size:
        result.notes.append(f"note: the model's vocabulary ({vocab_size}) is padded beyond the tokenizer's "
                            f"{tok.vocab_size} ids; ids {tok.vocab_size} .. {vocab_size - 1} have no token")
    folder = _hf_folder(spec) if spec != "default" else None
    if folder is not None:
        for name in HF_TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, out / name)
        return result
    source = DEFAULT_TOKENIZER_PATH if spec == "default" else Path(tok.path)
    if isinstance(tok, SentencePieceTokenizer):
        import sentencepiece

        shutil.copyfile(source, out / "tokenizer.model")
        sp = sentencepiece.SentencePieceProcessor(model_file=str(source))
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                  "bos_token": sp.id_to_piece(tok.bos_id), "eos_token": sp.id_to_piece(tok.eos_id)}
        if sp.unk_id() >= 0:
            config["unk_token"] = sp.id_to_piece(sp.unk_id())
    else:
        import tokenizers

        shutil.copyfile(source, out / "tokenizer.json")
        hf_tok = tokenizers.Tokenizer.from_file(str(source))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": hf_tok.id_to_token(tok.bos_id),
                  "eos_token": hf_tok.id_to_token(tok.eos_id)}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return result


def _byte_chars() -> list[str]:
    """The printable character that stands for each byte in a byte-level tokenizer.json (the mapping GPT-2
    introduced and `tokenizers`' ByteLevel pre-tokenizer applies): printable Latin-1 bytes stand for
    themselves, the others for 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def byte_level_tokenizer():
    """Spindle's byte tokenizer (ids 0..255 = the UTF-8 bytes, BOS 256, EOS 257) as a `tokenizers` Tokenizer:
    byte-level pre-tokenization without splitting, a BPE model of the 256 byte characters and no merges
    (so every byte is its own token, its id its value), BOS prepended as Spindle's generation does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {c: b for b, c in enumerate(_byte_chars())}
    vocab.update({"<s>": 256, "</s>": 257})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<s>", "</s>"])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 256)])
    return tk
