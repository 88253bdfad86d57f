"""Which tokenizer made a run's ids: recorded where ids are made, checked where they are used.

Where it is recorded:
- `spindle prepare`: in the output folder's manifest.json (key "tokenizer");
- tools/tokenizer.py and tools/alpaca_tokenizer.py: beside each InternEvo file, `NAME.bin.tokenizer.json`
  (a sidecar, so the `.bin` / `.bin.meta` bytes stay exactly the seed's);
- every checkpoint: `tokenizer_identity.json` in the step folder, hashed by its completion record.

An identity is what `Tokenizer.identity()` returns: kind, path (absolute), the SHA-256 of the tokenizer
file, vocab_size, bos_id, eos_id. Two identities give the same ids when everything but the path agrees
(`same_ids`): a copied tokenizer folder is the same tokenizer. The path is kept so that `convert to-hf`
and `generate` can find the file again; they re-hash it before use (`recorded_spec`), so a file changed
since training is refused rather than exported.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from spindle.errors import SpindleError

SIDECAR_SUFFIX = ".tokenizer.json"  # output.bin -> output.bin.tokenizer.json
CHECKPOINT_FILE = "tokenizer_identity.json"
RECORD_FORMAT = "spindle-tokenizer-identity-1"
ID_KEYS = ("kind", "sha256", "vocab_size", "bos_id", "eos_id")  # what decides the ids (not the path)
KINDS = ("sentencepiece", "hf", "byte")


@dataclass(frozen=True)
class Recorded:
    """An identity and where it was read (a sidecar, a manifest, a checkpoint, or data.tokenizer_path)."""

    identity: dict
    where: str


def same_ids(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ID_KEYS)


def describe(identity: dict) -> str:
    """One identity in words, for error lines: kind, file, size, hash prefix."""
    if identity.get("kind") == "byte":
        return f"the byte tokenizer ({identity.get('vocab_size')} ids)"
    sha = identity.get("sha256") or "?"
    bos = "" if identity.get("bos_id") is None else f", BOS {identity['bos_id']}"
    return (f"{identity.get('kind')} tokenizer {identity.get('path')} ({identity.get('vocab_size')} ids{bos}, "
            f"EOS {identity.get('eos_id')}, sha256 {sha[:12]})")


def _is_id(v, optional: bool = False) -> bool:
    return (v is None and optional) or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31)


def parse_identity(obj, where: str) -> dict:
    """An identity read from a file (untrusted data): every key checked, one line naming the file."""
    def bad(what: str) -> SpindleError:
        return SpindleError(f"{where}: not a tokenizer identity record ({what})")

    if not isinstance(obj, dict):
        raise bad(f"expected a JSON object, got {type(obj).__name__}")
    kind, path, sha = obj.get("kind"), obj.get("path"), obj.get("sha256")
    if kind not in KINDS:
        raise bad(f"'kind' must be one of {', '.join(KINDS)}, got {kind!r:.40}")
    if not _is_id(obj.get("vocab_size")) or obj["vocab_size"] == 0:
        raise bad("'vocab_size' must be a positive integer")
    if not _is_id(obj.get("bos_id"), optional=True) or not _is_id(obj.get("eos_id")):
        raise bad("'bos_id' must be an id or null and 'eos_id' an id")
    if kind != "byte":
        if not (isinstance(path, str) and 0 < len(path) <= 4096 and "\0" not in path and "\n" not in path):
            raise bad("'path' must be a file path")
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise bad("'sha256' must be 64 hex digits")
    return {"kind": kind, "path": path if kind != "byte" else None, "sha256": sha if kind != "byte" else None,
            "vocab_size": obj["vocab_size"], "bos_id": obj.get("bos_id"), "eos_id": obj["eos_id"]}


def record_bytes(identity: dict) -> bytes:
    return (json.dumps({"format": RECORD_FORMAT, **identity}, indent=1) + "\n").encode()


def parse_record(data: bytes, where: str) -> dict:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SpindleError(f"{where}: not a tokenizer identity record (not JSON: {exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != RECORD_FORMAT:
        raise SpindleError(f"{where}: not a tokenizer identity record (expected format {RECORD_FORMAT!r})")
    return parse_identity(obj, where)


# ------------------------------------------------------------------------------ data: written and read


def sidecar_path(bin_path: str) -> str:
    return bin_path + SIDECAR_SUFFIX


def write_sidecar(bin_path: str, identity: dict) -> str:
    from spindle.fileio import write_atomic

    path = sidecar_path(bin_path)
    write_atomic(path, record_bytes(identity))
    return path


def read_file_record(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError as exc:
        raise SpindleError(f"{path}: cannot read the tokenizer identity ({exc.strerror or exc})") from None
    return parse_record(data, path)


def recorded_identities(files: Iterable[str]) -> dict[str, Optional[dict]]:
    """Where the tokenizer of each of `files` is recorded -> that identity: a `.bin`'s sidecar file, else its
    folder (whose manifest.json records it; None when that manifest names none). Files with no record at all
    (InternEvo's own `.bin` files, older tools) are left out: their tokenizer is unknown, not different."""
    from spindle.data.shards import JSON_EXT, MANIFEST, read_manifest

    out: dict[str, Optional[dict]] = {}
    for f in files:
        folder = os.path.dirname(f)
        if f.endswith(JSON_EXT) and os.path.isfile(sidecar_path(f)):
            out[sidecar_path(f)] = read_file_record(sidecar_path(f))
        elif folder not in out and os.path.isfile(os.path.join(folder, MANIFEST)):
            out[folder] = read_manifest(folder).get("tokenizer")
    return out


def refuse_mixed(records: dict[str, Optional[dict]], key: str) -> Optional[Recorded]:
    """The one tokenizer `records` agree on (None when none records one); one line naming two that differ."""
    first: Optional[Recorded] = None
    for where, ident in records.items():
        if not ident:
            continue
        if first is None:
            first = Recorded(ident, where)
        elif not same_ids(first.identity, ident):
            raise SpindleError(f"{key}: {first.where} and {where} were prepared with different tokenizers "
                               f"({describe(first.identity)} vs {describe(ident)}); prepare every source with "
                               f"the same tokenizer")
    return first


def run_tokenizer(data) -> Optional[Recorded]:
    """The tokenizer a run's ids come from (`data` is the DataConfig): what its training and validation files
    record (all the same), checked against `data.tokenizer_path` when both are known; for raw text the
    tokenizer the loader tokenizes with. None when nothing says (generated data, unrecorded `.bin` files
    and no data.tokenizer_path)."""
    from spindle.data.shards import find_token_files
    from spindle.data.tokenizer import load_tokenizer

    configured = None
    if data.tokenizer_path:
        configured = Recorded(load_tokenizer(data.tokenizer_path).identity(),
                              f"data.tokenizer_path {data.tokenizer_path}")
    if data.type == "text":
        return configured or Recorded(load_tokenizer("default").identity(), "the default tokenizer (data.type text)")
    if data.type != "tokenized" or not data.train_folder or not os.path.isdir(data.train_folder):
        return configured  # streaming tokenizes with data.tokenizer_path; a missing folder is the loader's line
    files = find_token_files(data.train_folder)
    if data.valid_folder and os.path.isdir(data.valid_folder):
        files += find_token_files(data.valid_folder)
    recorded = refuse_mixed(recorded_identities(files), "data")
    if recorded is not None and configured is not None and not same_ids(recorded.identity, configured.identity):
        raise SpindleError(f"{configured.where}: {describe(configured.identity)} is not the tokenizer "
                           f"{recorded.where} was prepared with ({describe(recorded.identity)}); set "
                           f"data.tokenizer_path to that one, or prepare the data again with this one")
    return recorded or configured


# ------------------------------------------------------------------------------ checkpoints


def checkpoint_files(recorded: Optional[Recorded]) -> dict[str, bytes]:
    """The file a checkpoint gets beside its tensors ({} when the run's tokenizer is unknown)."""
    return {} if recorded is None else {CHECKPOINT_FILE: record_bytes(recorded.identity)}


def read_checkpoint_record(read: Callable[[str], bytes], where: str) -> Optional[Recorded]:
    """The identity a checkpoint records; `read(name)` gives a file of the step folder (FileNotFoundError,
    or storage's StorageNotFound, when absent). None for checkpoints written before it was recorded."""
    try:
        data = read(CHECKPOINT_FILE)
    except FileNotFoundError:
        return None
    path = f"{where}/{CHECKPOINT_FILE}"
    return Recorded(parse_record(data, path), path)


def local_checkpoint_record(folder: Path) -> Optional[Recorded]:
    return read_checkpoint_record(lambda name: (Path(folder) / name).read_bytes(), str(folder))


def recorded_spec(recorded: Recorded, option: str = "--tokenizer") -> str:
    """A `load_tokenizer` spec for the tokenizer `recorded` names, after checking that its file still holds
    the same bytes: the recorded path, or the packaged default when that is the same file; one line naming
    `option` when neither does."""
    from spindle.data.tokenizer import DEFAULT_TOKENIZER_PATH, _sha256

    ident = recorded.identity
    if ident["kind"] == "byte":
        return "byte"
    if DEFAULT_TOKENIZER_PATH.is_file() and _sha256(DEFAULT_TOKENIZER_PATH) == ident["sha256"]:
        return "default"  # the packaged one, wherever this installation keeps it
    path, now = ident["path"], None
    if os.path.isfile(path):
        try:
            now = _sha256(path)
        except OSError:
            now = None
        if now == ident["sha256"]:
            return path
    state = "is gone" if now is None else f"has changed since (sha256 now {now[:12]})"
    raise SpindleError(f"{recorded.where}: the model was trained with {describe(ident)}, whose file {state}; "
                       f"name a copy of that tokenizer with {option}")


def choose_export_tokenizer(recorded: Optional[Recorded], configured: Optional[str], option: Optional[str],
                            where: str) -> tuple[str, str]:
    """(spec, why) for `convert to-hf`: `--tokenizer` (which must give the recorded ids when there is a
    record), else the checkpoint's record, else its config's data.tokenizer_path; never a silent default."""
    from spindle.data.tokenizer import load_tokenizer

    if option == "none":  # weights alone, asked for in so many words
        return option, "--tokenizer"
    if option:
        if recorded is not None:
            given = load_tokenizer(option).identity()
            if not same_ids(given, recorded.identity):
                raise SpindleError(f"--tokenizer {option}: {describe(given)} is not the tokenizer the model was "
                                   f"trained with ({describe(recorded.identity)}, {recorded.where})")
        return option, "--tokenizer"
    if recorded is not None:
        return recorded_spec(recorded), f"recorded in {recorded.where}"
    if configured:
        return configured, "data.tokenizer_path of the checkpoint's config"
    raise SpindleError(f"{where}: the checkpoint does not record which tokenizer made its training data "
                       f"(generated data, or files without a tokenizer record) and its config sets no "
                       f"data.tokenizer_path; name it: --tokenizer PATH (--tokenizer default for the packaged "
                       f"one, --tokenizer none for the weights alone)")
