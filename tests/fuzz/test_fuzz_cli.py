"""Fuzzing the command line: every option of every command (found by walking the real parsers) with
hostile values — non-finite, negative, huge, fractional, empty, malformed lists, unknown choices —
through `spindle.cli.main` in this process. Each case either succeeds (exit 0) or prints exactly one
line `spindle: error: ...` with exit code 2; a traceback, another exit code, or a second line is a bug.

Paths given to commands point into an empty scratch folder, so an argument list that passes every
check stops at the first file the command reads (one line) instead of doing hours of work; `bench`
is left out for that reason (its options are the benchmark scripts', run by tests/unit/test_bench.py).

New argument lists every run (a fresh seed), the argument lists that once failed replayed from
tests/fuzz/corpus/cli/ ("{scratch}" in them is the scratch folder); tests/fuzz/fuzzing.py says how.

    FUZZ_EXAMPLES=100000 .venv/bin/python -m pytest tests/fuzz/test_fuzz_cli.py -q
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import EXAMPLES, announce, corpus, fuzz_settings

pytestmark = pytest.mark.fuzz
COMMANDS = ("train", "generate", "prepare", "tokenizer", "convert", "eval", "rope")


class _Captured(Exception):
    pass


def command_parsers() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """The parser of every command and subcommand, taken from the commands themselves: parse_known_args
    is intercepted at its first call, so nothing runs."""
    from spindle.cli import main

    found: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    real = argparse.ArgumentParser.parse_known_args

    def walk(path, parser):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            found[path] = parser
        for action in subs:
            for name, sub in action.choices.items():
                walk(path + (name,), sub)

    for cmd in COMMANDS:
        def capture(self, *a, cmd=cmd, **k):
            walk((cmd,), self)
            raise _Captured

        argparse.ArgumentParser.parse_known_args = capture
        try:
            with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                main([cmd])
        except _Captured:
            pass
        finally:
            argparse.ArgumentParser.parse_known_args = real
    return found


PARSERS = command_parsers()

NUMBERS = ["nan", "inf", "-inf", "-1", "0", "1", "2", "3", "0.5", "-0.5", "1e309", "1e-320", "99999999999999999999",
           "4096", "1e12", "0x10", "1_000", " 7", "abc", ""]
LISTS = ["1,2", "16,nan", "0,", ",", "1-3", "4096,inf", "-8,16", "1e9,2e9", "64;128", "a,b"]
# no NUL: argv cannot hold one
TEXTS = ["", " ", "x", "--", "-", "auto", "cpu", "cuda", "meta", "cuda:9", "torch.float16", "dynamic", "ntk:2",
         "yarn:4", "linear:-1", "none", "é", "default", "byte", "hf", "{\"a\": 1}", "s3://b/k"]


def value_pool(action: argparse.Action, scratch: Path) -> st.SearchStrategy:
    choices = list(action.choices) if action.choices else []
    paths = [str(scratch / "missing"), str(scratch / "missing" / "x.bin"), str(scratch / "out"), str(scratch)]
    pool = NUMBERS + LISTS + TEXTS + paths + [str(c) for c in choices]
    return st.sampled_from(pool)


@st.composite
def argv_cases(draw, scratch: Path):
    path = draw(st.sampled_from(sorted(PARSERS)))
    parser = PARSERS[path]
    argv = list(path)
    # --debug asks for the traceback: the one option whose failure is not one line
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction) and a.dest != "debug"]
    positionals = [a for a in actions if not a.option_strings]
    optionals = [a for a in actions if a.option_strings]
    chosen = draw(st.lists(st.sampled_from(optionals), max_size=5, unique_by=id)) if optionals else []
    required = [a for a in optionals if a.required and a not in chosen]
    for action in chosen + required:
        argv.append(draw(st.sampled_from(action.option_strings)))
        if action.nargs == 0:
            continue
        count = 2 if action.nargs in ("+", "*", 2) else 1
        argv += [draw(value_pool(action, scratch)) for _ in range(count)]
    for action in positionals:
        argv.append(draw(value_pool(action, scratch)))
    if path == ("train",) and "--config" not in argv:  # without one, `spindle train` trains the demo
        argv += ["--config", str(scratch / "missing" / "cfg.py")]
    return argv


@pytest.fixture(scope="module")
def scratch():
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    d = Path(tempfile.mkdtemp(prefix="spindle-fuzz-cli-", dir=shm))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_the_parsers_were_found():
    # every command and subcommand is fuzzed; a new one shows up here without a change to this file
    assert {p[0] for p in PARSERS} == set(COMMANDS)
    assert {("eval", "ppl"), ("eval", "passkey"), ("convert", "to-hf"), ("tokenizer", "train")} <= set(PARSERS)
    assert all(any(a.option_strings for a in p._actions) for p in PARSERS.values())


def check_argv(argv: list[str], scratch: Path) -> int:
    """`spindle ARGV...` in this process: exit 0, or exit 2 with one `spindle: error:` line; never a traceback.
    Returns the exit code. What it wrote in `scratch` is removed (it would steer the next case)."""
    from spindle.cli import main

    out, err = io.StringIO(), io.StringIO()
    if os.environ.get("FUZZ_TRACE"):
        print(argv, file=sys.__stderr__, flush=True)
    env = dict(os.environ)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            rc = main(argv)
    finally:
        os.environ.clear()
        os.environ.update(env)
        for child in scratch.iterdir():
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
    text = err.getvalue()
    assert "Traceback" not in text + out.getvalue(), (argv, text)
    assert rc in (0, 2), (argv, rc, text)
    if rc == 2:
        lines = text.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("spindle: error: "), (argv, text)
    return rc


@pytest.mark.slow  # the search: FUZZ_EXAMPLES cases
def test_fuzz_cli_options(scratch):
    announce("cli")
    seen = {"cases": 0, "errors": 0}

    @fuzz_settings
    @given(data=st.data())
    def one(data):
        rc = check_argv(data.draw(argv_cases(scratch)), scratch)
        seen["cases"] += 1
        seen["errors"] += rc == 2

    one()
    print(f"fuzz cli options: {seen['cases']} cases, {seen['errors']} refused")
    assert seen["cases"] >= EXAMPLES and seen["errors"] > seen["cases"] // 2


@pytest.mark.parametrize("name, argv", [pytest.param(name, argv, id=name) for _, name, argv in corpus("cli")])
def test_corpus_argv_that_once_failed(scratch, name, argv):
    check_argv([a.replace("{scratch}", str(scratch)) for a in argv], scratch)
