"""Loading a config file: run it (it is Python), apply `--set` overrides, validate, say what is wrong in one line.

A config file is plain Python, exactly as the seed guide writes it: module-level constants
(`JOB_NAME`, `SEQ_LEN`, ...) and dicts (`model`, `data`, `ckpt`, ...). Loading executes the file
(it is code: trust it as you trust a script you run), keeps every global that is not a dunder,
module, class or function, and validates the result against the schema (unknown keys are errors,
every key has a default). Errors come out as one `SpindleError` line naming the file, the key path
and what was expected.
"""

from __future__ import annotations

import ast
import difflib
import json
import math
import types
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ValidationError

from spindle.config.internevo import _split_constants, compatibility_notes, translate_moe, translate_parallel
from spindle.config.redact import redact
from spindle.config.schema import SpindleConfig
from spindle.errors import SpindleError
from spindle.fileio import write_atomic

def _collect_globals(namespace: dict) -> dict:
    """InternEvo's rule: every global that is not a dunder, module, class or function is a key."""
    out = {}
    for key, value in namespace.items():
        if key.startswith("__") or isinstance(value, (types.ModuleType, type, types.FunctionType)):
            continue
        out[key] = value
    return out


def _section_model(path: tuple) -> Optional[type[BaseModel]]:
    """The pydantic model at a key path, to suggest the closest valid key."""
    model: Any = SpindleConfig
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _format_error(err: dict) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    # drop pydantic's union-branch labels (e.g. 'bool', 'float') from the path
    clean = tuple(p for p in loc if p not in ("bool", "float", "int", "str", "constrained-float", "tagged-union"))
    key = ".".join(str(p) for p in clean) or "<config>"
    if err["type"] == "extra_forbidden":
        parent = _section_model(clean[:-1])
        hint = ""
        if parent is not None:
            close = difflib.get_close_matches(str(clean[-1]), list(parent.model_fields), n=1, cutoff=0.5)
            if close:
                hint = f"; did you mean '{'.'.join(str(p) for p in clean[:-1] + (close[0],))}'?"
        return f"{key}: unknown key{hint}"
    given = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    if not clean:  # a check across sections names its keys itself; the input is the whole file
        return msg
    return f"{key}: {msg} (got {given!r})"


def validate_config(raw: dict, source: str = "<config>") -> SpindleConfig:
    keys, constants = _split_constants(_copy_tree(raw))
    translated = translate_parallel(keys) + translate_moe(keys, source)
    if isinstance(keys.get("constants", {}), dict):  # else the schema reports `constants` (fuzz: constants=None)
        keys.setdefault("constants", {}).update(constants)
    try:
        cfg = SpindleConfig.model_validate(keys)
    except ValidationError as exc:
        errors = exc.errors()
        first = _format_error(errors[0])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise SpindleError(f"{source}: {first}{more}") from None
    cfg._compat_notes = translated + compatibility_notes(keys, source)
    if cfg.data.text_valid_bytes and cfg.data.type != "text":  # e.g. the demo switched to token files
        cfg._compat_notes.append(f"data.text_valid_bytes (holds out raw-text files; data.type is "
                                 f"{cfg.data.type!r}: validate with data.valid_folder)")
    return cfg


def parse_override(item: str) -> tuple[list[str], Any]:
    """'data.micro_bsz=4' -> (['data', 'micro_bsz'], 4). Values are Python literals, else strings."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise SpindleError(f"--set {item!r}: expected KEY=VALUE, e.g. data.micro_bsz=4")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = {"true": True, "false": False, "none": None, "inf": math.inf}.get(text.lower(), text)
    return key.strip().split("."), value


# (derived key, the key it is derived from): when the file derives the key from its source (the seed's
# `lr_scheduler = dict(total_steps=data["total_steps"])`, or both written as the same constant, the demo's
# TOTAL_STEPS) and `--set` changes only the source, the derived key follows, as it would had the file been
# edited. A value the file states (a literal, or any other expression) is the user's: never rewritten.
DERIVED_KEYS = ((("lr_scheduler", "total_steps"), ("data", "total_steps")),
                (("beta2_scheduler", "init_beta2"), ("adam", "adam_beta2")),
                (("beta2_scheduler", "c"), ("adam", "adam_beta2_c")),
                (("data", "valid_micro_num"), ("data", "micro_num")))


def _key_expressions(tree: ast.Module) -> dict:
    """(section, key) -> the expression the file assigns it: `section = dict(key=...)`, `section = {"key": ...}`
    or `section["key"] = ...` at the top level (the last one wins, as when the file runs)."""
    found: dict = {}
    for node in tree.body:
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            if isinstance(target, ast.Name) and isinstance(node.value, ast.Call) and \
                    isinstance(node.value.func, ast.Name) and node.value.func.id == "dict":
                found.update({(target.id, kw.arg): kw.value for kw in node.value.keywords if kw.arg})
            elif isinstance(target, ast.Name) and isinstance(node.value, ast.Dict):
                found.update({(target.id, k.value): v for k, v in zip(node.value.keys, node.value.values)
                              if isinstance(k, ast.Constant)})
            elif isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name) and \
                    isinstance(target.slice, ast.Constant):
                found[(target.value.id, target.slice.value)] = node.value
    return found


def _reads_key(expr: ast.AST, section: str, key: str) -> bool:
    """`expr` reads `section["key"]` (or `section.get("key")`)."""
    for node in ast.walk(expr):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == section \
                and isinstance(node.slice, ast.Constant) and node.slice.value == key:
            return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" and \
                isinstance(node.func.value, ast.Name) and node.func.value.id == section and node.args and \
                isinstance(node.args[0], ast.Constant) and node.args[0].value == key:
            return True
    return False


def derived_in_file(tree: ast.Module) -> frozenset:
    """The derived keys of DERIVED_KEYS that the file derives from their source rather than states."""
    exprs = _key_expressions(tree)
    out = set()
    for derived, source in DERIVED_KEYS:
        mine, theirs = exprs.get(derived), exprs.get(source)
        if mine is None:
            continue
        same_name = theirs is not None and not isinstance(mine, ast.Constant) and ast.dump(mine) == ast.dump(theirs)
        if same_name or _reads_key(mine, *source):
            out.add(derived)
    return frozenset(out)


def _copy_tree(value: Any) -> Any:
    """A copy of the nested dicts and lists of a config; every other value kept as the file made it."""
    if isinstance(value, dict):
        return {k: _copy_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_tree(v) for v in value)
    return value


def _get(raw: dict, path) -> Any:
    node = raw
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def apply_overrides(raw: dict, overrides: list[str], derived: frozenset = frozenset()) -> dict:
    """`--set KEY.PATH=VALUE` on the keys of a loaded config (module-level constants go through
    `read_config_file(constants=...)` instead, so that what the file derives from them follows).
    `derived`: the keys the file derives from another (`derived_in_file`), which follow that key."""
    raw = _copy_tree(raw)
    parsed = [parse_override(item) for item in overrides]
    set_paths = {tuple(path) for path, _ in parsed}
    follow = [(key, source) for key, source in DERIVED_KEYS
              if key in derived and source in set_paths and key not in set_paths]
    for path, value in parsed:
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    for key, source in follow:
        if isinstance(_get(raw, key[:1]), dict):
            raw[key[0]][key[1]] = _get(raw, source)
    return raw


def constant_overrides(overrides: list[str], raw_keys: Optional[set] = None) -> tuple[dict, list[str]]:
    """Split `--set` items into module-level constants (`SEQ_LEN=4096`: one part, upper case, not a
    schema key) and the rest."""
    constants, rest = {}, []
    for item in overrides:
        path, value = parse_override(item)
        if len(path) == 1 and path[0].isupper() and path[0] not in SpindleConfig.model_fields:
            constants[path[0]] = value
        else:
            rest.append(item)
    return constants, rest


def _substitute_constants(tree: ast.Module, constants: dict, path: Path) -> ast.Module:
    """Replace the value of each top-level `NAME = ...` by the override, so everything the file derives
    from NAME afterwards follows it. A name not assigned exactly once at the top level is refused."""
    for name, value in constants.items():
        sites = [node for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                 and any(isinstance(t, ast.Name) and t.id == name
                         for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))]
        if len(sites) != 1:
            what = "is not assigned at the top level of" if not sites else f"is assigned {len(sites)} times in"
            raise SpindleError(f"--set {name}={value!r}: {name} {what} {path}; nothing to apply it to "
                               "(set the keys that use it, e.g. --set data.seq_len=...)")
        try:
            sites[0].value = ast.parse(repr(value), mode="eval").body
        except SyntaxError:
            raise SpindleError(f"--set {name}: the value {value!r} cannot be written into a config file") from None
    return ast.fix_missing_locations(tree)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return list(value)
    return repr(value)


def read_config_file(path: str | Path, constants: Optional[dict] = None) -> dict:
    """Execute a Python config file and return its keys; syntax and runtime errors name file and line.
    `constants` replace the values of module-level assignments (`--set SEQ_LEN=4096`) before it runs."""
    path = Path(path)
    if not path.is_file():
        raise SpindleError(f"config file not found: {path}")
    source = path.read_text(encoding="utf-8", errors="replace")
    try:
        tree = ast.parse(source, str(path))
    except SyntaxError as exc:
        raise SpindleError(f"{path}:{exc.lineno}: config does not parse: {exc.msg}") from None
    if constants:
        tree = _substitute_constants(tree, constants, path)
    namespace = {"__name__": "__spindle_config__", "__file__": str(path)}
    try:
        exec(compile(tree, str(path), "exec"), namespace)
    except SpindleError:
        raise
    except Exception as exc:  # noqa: BLE001 - any error in user code becomes one clear line
        line = _user_line(exc, path)
        raise SpindleError(f"{path}{f':{line}' if line else ''}: error while running the config: "
                           f"{type(exc).__name__}: {exc}") from None
    return _collect_globals(namespace)


def _user_line(exc: BaseException, path: Path) -> Optional[int]:
    tb, line = exc.__traceback__, None
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).resolve() == path.resolve():
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> SpindleConfig:
    """Load a Python config file (or only defaults when path is None) with `--set` overrides."""
    constants, overrides = constant_overrides(list(overrides or []))
    if constants and path is None:
        raise SpindleError(f"--set {next(iter(constants))}: the defaults have no module-level constants; "
                           "set the keys themselves (e.g. data.seq_len=...)")
    raw = read_config_file(path, constants) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if constants:
        source += " (with --set " + ", ".join(constants) + ")"
    if overrides:
        derived = derived_in_file(ast.parse(Path(path).read_text(encoding="utf-8", errors="replace"))) \
            if path is not None else frozenset()
        raw = apply_overrides(raw, overrides, derived)
        source += " (with --set overrides)"
    return validate_config(raw, source)


def save_resolved_config(cfg: SpindleConfig, run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "config.json"
    write_atomic(out, (json.dumps(redact(cfg.to_dict()), indent=2, default=_jsonable) + "\n").encode())
    return out
