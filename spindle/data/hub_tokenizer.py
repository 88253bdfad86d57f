"""What a tokenizer folder from the Hub says beside its model file.

`tokenizer_config.json` (and the older `special_tokens_map.json`) name the BOS and EOS tokens —
`"bos_token": null` when the model has no BOS, as Qwen2 ships — whether BOS is added
(`add_bos_token`), the tokens added on top of the model (`added_tokens_decoder`) and the chat
template (`chat_template`, a string or a list of named templates; newer folders keep it in
`chat_template.jinja` or `chat_template.json`). `auto_map` entries point at remote code: they are
never followed (InternLM2's folder is its sentencepiece `tokenizer.model` plus this config).
Nothing here imports transformers; the files are JSON read as data.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from spindle.errors import SpindleError

UNSET = "<unset>"  # a key the folder does not mention (unlike null: "this model has none")
TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+=* \d+\r?\n")


@dataclass
class FolderConfig:
    bos: Optional[str] = UNSET  # token text, None (no BOS), or UNSET
    eos: Optional[str] = UNSET
    add_bos: Optional[bool] = None
    chat_template: Optional[str] = None
    added: dict[str, int] = field(default_factory=dict)  # special added tokens: text -> id


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise SpindleError(f"{path}: unreadable tokenizer config ({e})") from None
    if not isinstance(data, dict):
        raise SpindleError(f"{path}: expected a JSON object")
    return data


def _token_text(value, where: str):
    """A special-token entry: "text", {"content": "text", ...} or null."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise SpindleError(f"{where}: expected a token string, an object with 'content', or null")
    return value


def _chat_template(folder: str, config: dict, cfg_path: str) -> Optional[str]:
    tpl = config.get("chat_template")
    if isinstance(tpl, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    if tpl is not None and not isinstance(tpl, str):
        raise SpindleError(f"{cfg_path}: chat_template must be a string or a list of named templates")
    if tpl is None and os.path.isfile(os.path.join(folder, "chat_template.jinja")):
        with open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8") as f:
            tpl = f.read()
    if tpl is None and os.path.isfile(os.path.join(folder, "chat_template.json")):
        tpl = _read_json(os.path.join(folder, "chat_template.json")).get("chat_template")
    return tpl


def read_folder_config(folder: str) -> FolderConfig:
    """The special tokens and chat template a tokenizer folder declares (all UNSET/None without files)."""
    out = FolderConfig()
    config: dict = {}
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            data = _read_json(path)
            config.update(data)
            for key in ("bos", "eos"):
                if f"{key}_token" in data:
                    setattr(out, key, _token_text(data[f"{key}_token"], f"{path}: {key}_token"))
    if isinstance(config.get("add_bos_token"), bool):
        out.add_bos = config["add_bos_token"]
    for tid, tok in (config.get("added_tokens_decoder") or {}).items():
        if isinstance(tok, dict) and tok.get("special") and isinstance(tok.get("content"), str) and str(tid).isdigit():
            out.added[tok["content"]] = int(tid)
    out.chat_template = _chat_template(folder, config, cfg_path)
    return out


def is_tiktoken(path: str) -> bool:
    """A tiktoken BPE ranks file (base64 token, space, rank per line), as Llama 3 ships in original/."""
    try:
        with open(path, "rb") as f:
            return bool(TIKTOKEN_LINE.match(f.read(256)))
    except OSError:
        return False


def tiktoken_error(path: str) -> SpindleError:
    return SpindleError(f"{path}: a tiktoken BPE file (the original/tokenizer.model Llama 3 ships), which Spindle "
                        f"does not read; point at the Hub folder that holds tokenizer.json instead")
