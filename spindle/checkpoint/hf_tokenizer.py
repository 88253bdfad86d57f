"""The run's tokenizer, written next to exported weights so the folder is complete on its own.

Which tokenizer: `data.tokenizer_path`, or when that is unset the one the data tools use by default
(`load_tokenizer("default")`, the packaged sentencepiece model: tools/tokenizer.py and
`spindle prepare` tokenize with it unless told otherwise). A tokenizer whose ids do not fit the
model's vocabulary is not written (a note says so).

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


def write_tokenizer(spec: Optional[str], vocab_size: int, out: Path) -> TokenizerExport:
    from spindle.data.tokenizer import DEFAULT_TOKENIZER_PATH, SentencePieceTokenizer, load_tokenizer

    spec = spec or "default"
    if spec == "byte":
        return TokenizerExport(notes=["note: no tokenizer written: the byte tokenizer has no Hugging Face form"])
    try:
        tok = load_tokenizer(spec)
    except SpindleError as exc:
        return TokenizerExport(notes=[f"note: no tokenizer written: {exc}"])
    if tok.vocab_size > vocab_size:
        return TokenizerExport(notes=[f"note: no tokenizer written: {spec} has {tok.vocab_size} ids, more than the "
                                      f"model's vocab_size {vocab_size}"])
    result = TokenizerExport(tok.bos_id, tok.eos_id, tok.pad_id, [f"tokenizer: {spec}"])
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
