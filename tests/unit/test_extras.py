"""Dependencies as users install them (spindle/extras.py, pyproject.toml).

Two checks that need no one to remember them when an import is added:

- every import of a third-party package anywhere in spindle/ (module level or inside a function) is a core
  dependency of pyproject.toml; any other package is imported through `spindle.extras.require(module, extra,
  feature)`, and the extra it names lists that package;
- each extra's features, run with its packages blocked (as if not installed), stop with one line naming
  `pip install 'spindle[extra]'`; every package some `require` call names is blocked by a row of that table.

tests/e2e/test_fresh_install.py installs the wheel without extras in a new virtual environment and runs the demo.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

from spindle.errors import SpindleError

ROOT = Path(__file__).resolve().parents[2]
SPINDLE = ROOT / "spindle"


def _dist_name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    """(core distributions, {extra: distributions}) of pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {name: set(map(_dist_name, reqs)) for name, reqs in project["optional-dependencies"].items()}
    return set(map(_dist_name, project["dependencies"])), extras


@functools.cache
def _installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distributions(module: str) -> set[str]:
    """The installed distributions that provide the top-level package of `module`."""
    return {_dist_name(d) for d in _installed().get(module.split(".")[0], [])}


def _third_party(module: str) -> bool:
    top = module.split(".")[0]
    return top != "spindle" and top not in sys.stdlib_module_names


@functools.cache
def _trees() -> list[tuple[Path, ast.Module]]:
    """Every module of spindle/, parsed once for all the scans here."""
    return [(path, ast.parse(path.read_text(), str(path))) for path in sorted(SPINDLE.rglob("*.py"))]


@functools.cache
def _imports_and_requires():
    """([(where, module)] of import statements, [(where, module, extra)] of require calls) in spindle/."""
    imports, requires = [], []
    for path, tree in _trees():
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                imports += [(where, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imports.append((where, node.module))
            elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "require":
                args = [a.value if isinstance(a, ast.Constant) else None for a in node.args[:2]]
                if path.name != "extras.py":
                    assert len(args) == 2 and all(isinstance(a, str) for a in args), \
                        f"{where}: require() takes the module and the extra as literal strings"
                    requires.append((where, args[0], args[1]))
    return imports, requires


def test_every_import_is_a_core_dependency_or_goes_through_require():
    core, extras = _declared()
    imports, requires = _imports_and_requires()
    wrong = []
    for where, module in imports:
        if _third_party(module) and not _distributions(module) & core:
            wrong.append(f"{where}: imports {module}, not a core dependency: spindle.extras.require(...) it")
    for where, module, extra in requires:
        if extra not in extras:
            wrong.append(f"{where}: require({module!r}, {extra!r}): pyproject.toml has no extra {extra!r}")
        elif not _distributions(module) & extras[extra]:
            wrong.append(f"{where}: require({module!r}, {extra!r}): the [{extra}] extra does not list "
                         f"{sorted(_distributions(module)) or module}")
    assert not wrong, "\n".join(wrong)
    assert requires, "no require() call found: the scan is broken"


# Private names of other libraries still used, each with where and why; a new one fails the test below.
PRIVATE_IN_USE = {
    "torch._foreach_mul_": "spindle/train/optim.py: the in-place multi-tensor scale of unscaling and clipping "
                           "(torch.nn.utils.clip_grads_with_norm_ is the public form of the clipping one)",
    "torch._grouped_mm": "spindle/model/moe.py: the fallback on a torch without torch.nn.functional.grouped_mm",
    "torch.distributed.algorithms._checkpoint.checkpoint_wrapper": "spindle/parallel/parallelize.py: activation "
                                                                  "checkpointing of a block, as FSDP2 wraps it",
    "torch.serialization._get_layout": "spindle/checkpoint/dcp_io.py: a name DCP's pickled metadata refers to, "
                                       "admitted by the safe unpickler (never called by Spindle)",
}


def _private_uses() -> set[tuple[str, str]]:
    """(where, dotted name) of every private name of a third-party module spindle/ imports or reads: `from x
    import _y`, `import x._y`, and `x._y` / `x.y._z` on a name bound to an imported module."""
    found = set()
    private = re.compile(r"(^|\.)_(?!_)")
    for path, tree in _trees():
        modules = {}  # local name -> module
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if _third_party(alias.name):
                        # `import a.b as c` binds c to a.b; `import a.b` binds a to a
                        bound = alias.name if alias.asname else alias.name.split(".")[0]
                        modules[alias.asname or bound] = bound
                        if private.search(alias.name):
                            found.add((where, alias.name))
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _third_party(node.module):
                for alias in node.names:
                    name = f"{node.module}.{alias.name}"
                    if private.search(name):
                        found.add((where, name))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and not isinstance(getattr(node, "ctx", None), ast.Del):
                parts, value = [node.attr], node.value
                while isinstance(value, ast.Attribute):
                    parts.append(value.attr)
                    value = value.value
                if isinstance(value, ast.Name) and value.id in modules:
                    name = ".".join([modules[value.id], *reversed(parts)])
                    if private.search(name[len(modules[value.id]):]):
                        found.add((f"{path.relative_to(ROOT)}:{node.lineno}", name))
    return found


def test_no_private_names_of_other_libraries():
    found = _private_uses()
    new = sorted(f"{where}: {name}" for where, name in found
                 if not any(name == known or name.startswith(known + ".") for known in PRIVATE_IN_USE))
    assert not new, "private names of other libraries (use their public API):\n" + "\n".join(new)
    gone = {known for known in PRIVATE_IN_USE
            if not any(name == known or name.startswith(known + ".") for _, name in found)}
    assert not gone, f"no longer used: drop from PRIVATE_IN_USE: {sorted(gone)}"


def test_the_test_extra_installs_every_extra():
    """The README's set-up line installs [test]: the tests run every optional path."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    test = project["optional-dependencies"]["test"]
    named = {e for r in test if _dist_name(r) == "spindle" for e in re.search(r"\[(.*)\]", r).group(1).split(",")}
    assert named == set(project["optional-dependencies"]) - {"test", "all"}


# ----------------------------------------------------------------------------- each extra's line


@pytest.fixture
def block(monkeypatch):
    """Make packages look uninstalled: None in sys.modules for them and their loaded submodules."""
    def blocked(*packages: str) -> None:
        for name in list(sys.modules):
            if name.split(".")[0] in packages:
                monkeypatch.setitem(sys.modules, name, None)
        for name in packages:
            monkeypatch.setitem(sys.modules, name, None)
    return blocked


def _chat_template(tmp_path, monkeypatch):
    from spindle.data.chat import _render

    _render("{% for m in messages %}{{ m.content }}{% endfor %}", [{"role": "user", "content": "hi"}], "chat.jsonl")


def _hub_card(tmp_path, monkeypatch):
    from spindle.data.hub import split_files

    (tmp_path / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files: train.jsonl\n---\n")
    (tmp_path / "train.jsonl").write_text('{"text": "a"}\n')
    split_files(str(tmp_path))


def _hub_layout(tmp_path, monkeypatch):
    from spindle.data.hub import split_files

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train-00000-of-00001.jsonl").write_text('{"text": "a"}\n')
    split_files(str(tmp_path))


def _streaming(tmp_path, monkeypatch):
    from spindle.data.streaming import open_stream

    (tmp_path / "train.jsonl").write_text('{"text": "a"}\n')
    open_stream(str(tmp_path))


def _parquet(tmp_path, monkeypatch):
    from spindle.data.documents import iter_batches

    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    list(iter_batches(str(tmp_path / "a.parquet")))


def _s3_folder(tmp_path, monkeypatch):
    from spindle.checkpoint.storage import open_storage

    open_storage("boto3:s3://bucket/run")


def _harness(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "spindle.eval.harness", raising=False)
    importlib.import_module("spindle.eval.harness")


def _wandb(tmp_path, monkeypatch):
    trackers = pytest.importorskip("spindle.train.trackers")
    trackers.WandbTracker(trackers.WandbConfig(), "job", tmp_path, {}, None)


def _mlflow(tmp_path, monkeypatch):
    trackers = pytest.importorskip("spindle.train.trackers")
    trackers.MlflowTracker(trackers.MlflowConfig(), "job", tmp_path, {}, None)


# extra -> (the packages blocked, the features that need them, each called with tmp_path and monkeypatch)
FEATURES = {
    "hf": (("transformers", "datasets", "huggingface_hub", "pyarrow", "jinja2"),
           [_chat_template, _hub_card, _hub_layout, _streaming, _parquet]),
    "s3": (("boto3", "botocore"), [_s3_folder]),
    "eval": (("lm_eval",), [_harness]),
    "track": (("wandb", "mlflow"), [_wandb, _mlflow]),
}


@pytest.mark.parametrize("extra,feature", [(extra, f) for extra, (_, fs) in FEATURES.items() for f in fs],
                         ids=lambda v: getattr(v, "__name__", v))
def test_a_feature_without_its_extra_is_one_line_naming_it(extra, feature, block, tmp_path, monkeypatch):
    block(*FEATURES[extra][0])
    with pytest.raises(SpindleError) as err:
        feature(tmp_path, monkeypatch)
    line = str(err.value)
    assert f"pip install 'spindle[{extra}]'" in line and "\n" not in line, line


def test_eval_tasks_without_lm_eval_exits_2_with_the_line(block, tmp_path, capsys):
    from spindle.cli import main

    block("lm_eval")
    assert main(["eval", "tasks", "--ckpt", str(tmp_path), "--tasks", "hellaswag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'spindle[eval]'" in err[0], err


def test_every_required_package_is_blocked_by_a_row():
    """A new require() call fails here until FEATURES has a row proving its line."""
    _, requires = _imports_and_requires()
    covered = {(extra, package) for extra, (packages, _) in FEATURES.items() for package in packages}
    missing = sorted({f"{where}: {module} ([{extra}])" for where, module, extra in requires
                      if (extra, module.split(".")[0]) not in covered})
    assert not missing, "no row of FEATURES blocks these:\n" + "\n".join(missing)
