"""Walking data folders: every real file once, however the folder links back into itself.

`os.walk(followlinks=True)` and `Path.glob("**")` follow a symlink that points at an ancestor
until the path is too long (40 levels on Linux), so one loop lists every file about 40 times and
two loops multiply into a walk that never ends. Here a folder is entered once per real folder
(its `(st_dev, st_ino)`), and a file is listed once per real file, under the first path a
sorted walk meets it by. Every reader of a data folder walks through `walk_files`.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Optional

from spindle.errors import SpindleError


def _real_id(path: str) -> Optional[tuple[int, int]]:
    """(st_dev, st_ino) of what `path` points to; None for a dangling link."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def walk_files(root: str, skip_hidden: bool = False,
               keep: Optional[Callable[[str], bool]] = None) -> list[str]:
    """Files below `root` (links followed, sorted walk order): each real folder entered once and
    each real file listed once. `skip_hidden` leaves out names starting with "." (files and
    folders); `keep(path)` filters files by name before they are stat'ed."""
    if not os.path.isdir(root):
        raise SpindleError(f"{root}: folder not found")
    seen_dirs = {_real_id(root)}
    seen_files: set[tuple[int, int]] = set()
    out = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        entered = []
        for d in sorted(dirs):
            if skip_hidden and d.startswith("."):
                continue
            rid = _real_id(os.path.join(folder, d))
            if rid is not None and rid not in seen_dirs:  # a loop (or a second link to a folder) stops here
                seen_dirs.add(rid)
                entered.append(d)
        dirs[:] = entered
        for f in sorted(files):
            if skip_hidden and f.startswith("."):
                continue
            path = os.path.join(folder, f)
            if keep is not None and not keep(path):
                continue
            rid = _real_id(path)
            if rid is not None and rid not in seen_files:
                seen_files.add(rid)
                out.append(path)
    return out


def unique_files(paths: list[str]) -> list[str]:
    """`paths` in order, each real file once (the first path naming it)."""
    seen, out = set(), []
    for p in paths:
        rid = _real_id(p)
        if rid is not None and rid not in seen:
            seen.add(rid)
            out.append(p)
    return out


def glob_regex(pattern: str) -> re.Pattern:
    """A compiled glob (`*` inside one name, `**` across folders, `[...]`), as `datasets` and fsspec read it."""
    from fsspec.utils import glob_translate

    return re.compile(glob_translate(pattern))


def relative_glob(root: str, pattern: str, skip_hidden: bool = False) -> list[str]:
    """Files below `root` whose path relative to it matches `pattern` (loop-safe, sorted)."""
    rx = glob_regex(pattern)
    return sorted(p for p in walk_files(root, skip_hidden=skip_hidden)
                  if rx.match(os.path.relpath(p, root).replace(os.sep, "/")))


# ------------------------------------------------------------------------------ data fingerprints


def tokenizer_key(identity: Optional[dict]) -> Optional[dict]:
    """The part of a tokenizer identity that decides the ids (not where the file lies)."""
    if not identity:
        return None
    return {k: identity.get(k) for k in ("kind", "sha256", "vocab_size")}


def fingerprint(name: str, root: str, files: list[str], tokenizer: Optional[dict] = None) -> dict:
    """What a loader state depends on, for one source: its files (relative to `root`) with their
    sizes, the hash of every manifest among them, and the tokenizer identity. Sizes, not mtimes:
    a copied or re-downloaded folder with the same content resumes."""
    import hashlib

    sizes, manifests = {}, {}
    for f in files:
        rel = os.path.relpath(f, root)
        sizes[rel] = os.path.getsize(f)
        man = os.path.join(os.path.dirname(f), "manifest.json")
        rel_man = os.path.relpath(man, root)
        if rel_man not in manifests and os.path.isfile(man):
            with open(man, "rb") as fh:
                manifests[rel_man] = hashlib.sha256(fh.read()).hexdigest()
    return {"name": name, "files": sizes, "manifests": manifests, "tokenizer": tokenizer_key(tokenizer)}


def _fingerprint_change(old: dict, new: dict) -> Optional[str]:
    """The first difference between two fingerprints of one source, in words; None if equal."""
    for rel in sorted(set(old["files"]) | set(new["files"])):
        a, b = old["files"].get(rel), new["files"].get(rel)
        if a is None:
            return f"file {rel} was added"
        if b is None:
            return f"file {rel} is gone"
        if a != b:
            return f"file {rel} changed size ({a} -> {b} bytes)"
    for rel in sorted(set(old["manifests"]) | set(new["manifests"])):
        if old["manifests"].get(rel) != new["manifests"].get(rel):
            return f"manifest {rel} differs"
    if old.get("tokenizer") != new.get("tokenizer"):
        return f"tokenizer {old.get('tokenizer')} -> {new.get('tokenizer')}"
    return None


def _well_formed(saved) -> bool:
    def sizes(d, kind) -> bool:
        return isinstance(d, dict) and all(isinstance(k, str) and isinstance(v, kind) and not isinstance(v, bool)
                                           for k, v in d.items())

    return isinstance(saved, list) and all(
        isinstance(s, dict) and isinstance(s.get("name"), str) and sizes(s.get("files"), int)
        and sizes(s.get("manifests"), str) for s in saved)


def check_fingerprints(saved: Optional[list], current: list) -> None:
    """Refuse a loader state saved over other data. A state without a fingerprint (older
    checkpoints) loads with no check."""
    if saved is None:
        return
    if not _well_formed(saved):
        raise SpindleError("damaged loader state: its data fingerprint is malformed (expected a list of "
                           "{name, files, manifests, tokenizer} objects)")
    current = current or []
    hint = ("the saved data position would not continue the same data; restore the data, or resume "
            "without the sampler state (ckpt.load_ckpt_info content without 'sampler')")
    old_names, new_names = [s["name"] for s in saved], [s["name"] for s in current]
    if old_names != new_names:
        raise SpindleError(f"data changed since the checkpoint: sources {old_names} -> {new_names}; {hint}")
    for old, new in zip(saved, current):
        change = _fingerprint_change(old, new)
        if change:
            raise SpindleError(f"data changed since the checkpoint: source {old['name']!r}: {change}; {hint}")
