"""The docs run as written: every shell command in README.md and docs/*.md is run here, or listed with why
it cannot be.

Which commands: every line of a fenced block tagged bash / sh / shell / console (`$ ` prompts dropped,
`\\` continuations joined, `# comments` and blank lines ignored). A command written anywhere else in a
fence or an indented block (a line starting with `spindle `, `python`, `torchrun`, `.venv/bin/`, ...) fails
`test_every_command_block_is_tagged`: tag the block, and it is picked up.

How: each command is a key of RUNS (run in one scratch folder, after the README's demo, with the files it
names provided, and arguments after it that only shrink the sizes or let it replace an earlier command's
output; exit 0, the lines it promises and, in a console block, every output line the doc shows are asserted) or
of SKIPS (why it cannot run here). A new command in the docs that is in neither fails."""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest

from tests.journeys.shell import ROOT, SMALL, generated, ok, sh, user_folder

pytestmark = pytest.mark.journeys

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_TAGS = {"bash", "sh", "shell", "console"}
COMMAND_START = re.compile(r"^\s*(\$ )?([A-Z_]+=\S* )*(spindle |python3? |pytest |torchrun |srun |\.venv/bin/|bench/)")


def blocks(text: str):
    """(info string, lines) of each fenced block, and ("indented", lines) of each 4-space block after a blank line."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\S*)", lines[i])
        if m:
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            yield m.group(1).lower(), lines[i + 1:j]
            i = j + 1
        elif lines[i].startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            yield "indented", lines[i:j]
            i = j
        else:
            i += 1


def commands(tag: str, lines: list[str]) -> list[tuple[str, list[str]]]:
    """(command, the output the doc shows under it) for each command of a block; in a console block only
    `$ ` lines are commands and the lines after one are its output."""
    out, pending = [], ""
    for line in lines:
        if tag == "console" and not line.startswith("$ ") and not pending:
            if out and line.strip():
                out[-1][1].append(line.strip())
            continue
        line = line.removeprefix("$ ")
        if pending:
            line = pending + " " + line.strip()
            pending = ""
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1].rstrip()
            continue
        words = shlex.split(line, comments=True)
        if words:
            out.append((" ".join(w if w in ("&&", "||", "|") else shlex.quote(w) for w in words), []))
    return out


def doc_commands() -> list[tuple[str, str]]:
    """(first doc that writes it, command), each command once."""
    found = {}
    for doc in DOCS:
        for tag, lines in blocks(doc.read_text()):
            for cmd, _ in commands(tag, lines) if tag in SHELL_TAGS else ():
                found.setdefault(cmd, doc.relative_to(ROOT).as_posix())
    return [(doc, cmd) for cmd, doc in found.items()]


def shown_output(command: str) -> list[str]:
    """The output lines the docs' console blocks show under `command`."""
    return [line for doc in DOCS for tag, lines in blocks(doc.read_text()) if tag == "console"
            for cmd, shown in commands(tag, lines) if cmd == command for line in shown]


@dataclass(frozen=True)
class Run:
    expect: tuple[str, ...]  # lines (or parts of lines) the output must hold
    extra: tuple[str, ...] = ()  # appended after the command: smaller sizes, same code path
    command: str = ""  # run this instead, when the doc line also does what the test environment did already
    why: str = ""
    copy: tuple[str, str] = ()  # (from, to) in the folder first: a file the user has, made by an earlier command
    check: Optional[Callable[[str], object]] = None  # a check of the command's stdout beyond the lines it holds


DEMO = ("--set", "data.total_steps=4", *SMALL)
EVAL_SMALL = ("--lengths", "256,512", "--windows", "1", "--chunk", "256")
RUNS = {
    "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install -e '.[test]' && "
    ".venv/bin/spindle train": Run(
        ("done: 4 steps", "checkpoint saved at step 4", "sample (temperature 0.8"), DEMO, "spindle train",
        "the venv and the install are the test environment's own (.ci/run makes them in a fresh clone)"),
    "spindle train --config configs/7B_sft.py --dry-run --nproc 8": Run(
        ("layout for 8 process(es): data 8 x context 1 x pipeline 1 x tensor 1", "parameters: 7,321,423,872",
         "memory estimate per device")),
    "spindle train --config my.py --set data.micro_bsz=4 model.num_layers=2": Run(
        ("done: 3 steps", "sample (")),  # my.py: the demo at 3 steps (setup)
    "spindle prepare data/raw/ --out data/train/en/ --tokenizer default":
        Run(("documents,", "tokens in 1 shard(s) -> data/train/en/")),
    "spindle tokenizer train corpus.txt --vocab-size 8000 --out my_tokenizer/": Run(('"vocab_size": 8000',)),
    "spindle generate --ckpt runs/demo/ckpt --prompt 'import ' --max-new-tokens 40 --temperature 0.8 --top-p 0.9":
        Run(("import ",), ("--max-new-tokens", "8"), check=lambda stdout: generated(stdout, "import ")),
    "spindle eval ppl --ckpt runs/demo/ckpt --lengths 256,1024,4096,16384 --variants plain,dynamic,yarn,logn": Run(
        ("eval ppl: no --data, reading", "perplexity over the first L tokens", "logn"), EVAL_SMALL),
    "spindle eval passkey --ckpt runs/demo/ckpt --lengths 256,1024 --depths 0,0.5,1": Run(
        ("plain (mean",), ("--lengths", "256", "--samples", "1", "--variants", "plain")),
    "spindle rope --head-dim 128 --train-len 4096 --tune-len 16384 --target-len 100000": Run(
        ("target 100,000: smallest base 701,472 -> use 710,000 (predicted bound 100,872)",)),
    # docs/long-context.md shows their whole output in console blocks: every line shown is asserted
    "spindle rope --head-dim 64 --train-len 256 --base 20 40.7 163 10000 30000 1e5 1e6 1e8 --target-len 4096":
        Run(("critical base beta0        = 10,000",)),
    # over the README's hf_out/
    "spindle convert to-hf runs/demo/ckpt/latest hf_out/": Run(("(LlamaForCausalLM)",), ("--overwrite",)),
    "spindle convert from-hf path/to/hf_folder imported/":
        Run(("model = dict(",), copy=("hf_out", "path/to/hf_folder")),
    "spindle convert to-hf runs/demo/ckpt hf_out/": Run(("(LlamaForCausalLM)",)),
    ".venv/bin/python -m spindle.cli bench data --mb 2 --reps 3 --reads 20000 --out runs/bench_data.json": Run(
        ("results -> runs/bench_data.json",), ("--mb", "0.2", "--reps", "1", "--reads", "1000")),
    ".venv/bin/spindle bench gpu --preset tiny --device cpu --steps 4 --warmup 1 --no-compile": Run(
        ("tiny on cpu", "tokens/s median")),
    ".venv/bin/spindle bench moe --out runs/bench_moe.json": Run(
        ("MoE / dense step time, paired: median", "cross ranks"), ("--shape", "tiny", "--rounds", "1")),
    "spindle train --dry-run --set model.num_experts=8 model.top_k=2 model.moe_intermediate_size=128": Run(
        ("experts: 4 of 4 layers MoE, 8 experts, top 2, expert width 128; active parameters per token 1,139,136",)),
    "spindle eval ppl --ckpt runs/demo/ckpt --data held_out/ --lengths 256,512,1024,2048,4096,8192,16384 --variants "
    "plain,dynamic,yarn,logn --windows 8 --out eval/demo": Run(
        ("perplexity over the first L tokens",), EVAL_SMALL),  # held_out/: the user's text (setup)
    "spindle eval passkey --ckpt runs/demo/ckpt --lengths 256,1024,4096 --depths 0,0.25,0.5,0.75,1 --samples 5 "
    "--variants plain,dynamic --mode generate --out eval/passkey": Run(
        ("plain (mean", "dynamic (mean"), ("--lengths", "256", "--depths", "0,1", "--samples", "1")),
    # docs/long-context.md: long-context metrics while training, then their plot (4 steps, metrics at 2 and 4)
    "spindle train --set trainer.run_folder=runs/lc data.total_steps=40 data.valid_every=20 "
    "'long_eval={'\"'\"'lengths'\"'\"': [256, 1024, 4096], '\"'\"'variants'\"'\"': ['\"'\"'plain'\"'\"', "
    "'\"'\"'yarn'\"'\"'], '\"'\"'passkey_lengths'\"'\"': [512]}'": Run(
        ("long-context eval after step 1: ppl@256", "long-context eval after step 3:"),
        ("data.total_steps=4", "data.valid_every=2", *SMALL)),
    "spindle eval plot runs/lc/demo": Run(("wrote runs/lc/demo/long_context.png (ppl, passkey at steps 1, 3)",)),
}
SLOW_BENCH = "timing runs of minutes to hours on this 2-core machine"
TEMPLATE = "a synopsis: its capitals (HF_DIR, SRC, CKPT, OUT) stand for the user's folders"
SUITE = "the test suite itself (.ci/run runs all of it)"
# Each skipped command: why it cannot run here, and the test that runs what it does (its code or its concrete form).
SKIPS = {
    "spindle convert from-hf HF_DIR OUT": TEMPLATE + "; the concrete `spindle convert from-hf path/to/hf_folder "
        "imported/` runs here, and tests/e2e/test_convert.py::test_round_trip_from_hf_and_ckpt_type_hf",
    "spindle convert from-internevo SRC OUT": TEMPLATE + "; tests/unit/test_internevo_ckpt.py::"
        "test_from_internevo_cli_writes_a_spindle_checkpoint runs it on an InternEvo folder",
    "spindle convert to-hf CKPT OUT": TEMPLATE + "; the concrete `spindle convert to-hf runs/demo/ckpt hf_out/` "
        "runs here, and tests/e2e/test_convert.py::test_to_hf_same_logits",
    "spindle convert from-internevo save/1000 imported/": "needs InternEvo's own model_tp*_pp*.pt files; "
        "tests/unit/test_internevo_ckpt.py::test_from_internevo_cli_writes_a_spindle_checkpoint writes such a "
        "folder and converts it",
    "OMP_NUM_THREADS=1 pytest -s tests/unit/test_hf_families.py tests/unit/test_internevo_ckpt.py "
    "tests/distributed/test_sharded_load.py | grep PARITY": SUITE + ": those three files",
    ".venv/bin/python -m pytest -q -n 2 --dist loadgroup": SUITE,
    ".venv/bin/python -m pytest -q -n 2 --dist loadgroup -m 'not slow'": SUITE + ": its fast tier",
    ".venv/bin/python -m pytest tests/faults -m faults -s -q": SUITE + ": tests/faults",
    ".venv/bin/python -m pytest tests/fuzz -m fuzz -s -q": SUITE + ": tests/fuzz",
    ".venv/bin/python -m pytest tests/unit/test_monitor.py tests/unit/test_safety.py -q": SUITE + ": those two files",
    "spindle bench train --quick": SLOW_BENCH + "; tests/unit/test_bench.py::"
        "test_train_bench_variants_start_from_the_same_model runs its code on the tiny size",
    "spindle bench train --quick --variants spindle,hand --rounds 5": SLOW_BENCH + "; tests/unit/test_bench.py::"
        "test_train_bench_variants_start_from_the_same_model runs its code on the tiny size",
    ".venv/bin/python -m spindle.cli bench train": SLOW_BENCH + "; tests/unit/test_bench.py::"
        "test_train_bench_variants_start_from_the_same_model runs its code on the tiny size",
    ".venv/bin/python -m spindle.cli bench train --quick": SLOW_BENCH + "; tests/unit/test_bench.py::"
        "test_train_bench_variants_start_from_the_same_model runs its code on the tiny size",
    ".venv/bin/spindle bench attention --out runs/bench_attention_full.json": SLOW_BENCH + "; the kernels it "
        "times are tests/unit/test_attention.py's, and tests/unit/test_bench.py::test_cli_dispatch its dispatch",
    "spindle bench attention --quick": SLOW_BENCH + " (--quick alone is 2 minutes here); the kernels it times are "
        "tests/unit/test_attention.py's, and tests/unit/test_bench.py::test_cli_dispatch its dispatch",
    "python -m spindle.benchmarks.bench_cp_memory --lengths 16384 --steps 2": SLOW_BENCH + "; the context-parallel "
        "kernel it measures is tests/unit/test_context_kernel.py's and tests/distributed/test_parity.py's (cp2)",
    "python -m spindle.benchmarks.bench_cp_memory --lengths 32768 --contexts 1 --steps 1": SLOW_BENCH + "; the "
        "context-parallel kernel it measures is tests/unit/test_context_kernel.py's and tests/distributed/"
        "test_parity.py's (cp2)",
    "python -m spindle.benchmarks.bench_cp_memory --lengths 16384,32768 --contexts 2 --steps 2": SLOW_BENCH + "; "
        "the context-parallel kernel it measures is tests/unit/test_context_kernel.py's and tests/distributed/"
        "test_parity.py's (cp2)",
    ".venv/bin/python -m spindle.cli bench memory --out runs/bench_memory.json": SLOW_BENCH + " (50 s in the suite "
        "even on 2 lengths); tests/unit/test_bench.py::test_memory_bench_small_lengths runs its code on small lengths",
    "bench/gpu.sh": "needs a CUDA GPU; its CPU form runs in tests/e2e/test_gpu_sh.py::test_cpu_smoke_runs_every_stage "
        "(and `spindle bench gpu --device cpu` here)",
    "bench/gpu.sh --micro-bsz 8": "needs a CUDA GPU; tests/e2e/test_gpu_sh.py::test_cpu_smoke_runs_every_stage "
        "runs the script on the CPU",
    "bench/gpu.sh --preset tiny --device cpu": "run by tests/e2e/test_gpu_sh.py::test_cpu_smoke_runs_every_stage "
        "(every stage, its JSON checked)",
    "bench/gpu_wheels.sh": "downloads from PyPI; tests/unit/test_gpu_deps.py::test_requirements_carry_pyproject_ranges "
        "checks what it asks for",
    "spindle eval ppl --ckpt /tmp/attn/demo/demo/ckpt --lengths L --variants plain --windows 1 --threads 2":
        "a template: L stands for each length of the benchmark, the folder is that benchmark's own run; `spindle "
        "eval ppl` runs here and in tests/e2e/test_eval_cli.py::test_eval_ppl_writes_json_and_png",
    # docs/evaluation.md: lm-eval's own tasks come from the Hugging Face hub, and my_tasks/ is the user's YAML
    "pip install 'spindle[eval]'": "installs from PyPI; the [test] extra this environment has carries lm-eval, "
        "which tests/e2e/test_lm_eval.py::test_spindle_eval_tasks_prints_the_scores runs",
    "spindle eval tasks --ckpt runs/demo/ckpt --tasks my_task --include-path my_tasks/": "my_tasks/ stands for "
        "the user's task folder; tests/e2e/test_lm_eval.py::test_spindle_eval_tasks_prints_the_scores writes one "
        "and runs this command on it",
    "python -m spindle.eval.harness run --model spindle --model_args ckpt=runs/demo/ckpt,rope=yarn:4,max_length=1024 "
    "--tasks hellaswag --num_fewshot 5 --batch_size 8 --log_samples --output_path eval/hellaswag": "hellaswag "
        "downloads from the Hugging Face hub; tests/e2e/test_lm_eval.py::"
        "test_same_per_sample_loglikelihoods_as_lm_evals_hf_backend runs the same model on local tasks",
    "torchrun --nproc_per_node 8 -m spindle.eval.harness run --model spindle --model_args ckpt=runs/demo/ckpt "
    "--tasks hellaswag --batch_size 16": "8 GPUs and the hub; tests/e2e/test_lm_eval.py::"
        "test_torchrun_ranks_are_lm_eval_ranks runs 2 ranks on the CPU",
}


def test_every_skip_names_the_test_that_covers_it():
    """A skipped command is not run here: its reason names where what it does is tested."""
    for command, why in SKIPS.items():
        if why.startswith(SUITE):
            continue
        named = re.findall(r"tests/[\w/]+\.py(?:::\w+)?", why)
        assert named, f"{command}: the reason names no test ({why})"
        for ref in named:
            path, _, name = ref.partition("::")
            assert (ROOT / path).is_file() and (not name or f"def {name}(" in (ROOT / path).read_text()), ref


def setup_folder(folder: Path) -> None:
    """The files the commands name that a user would have made themselves."""
    user_folder(folder)
    demo = (ROOT / "configs/demo.py").read_text()
    assert "TOTAL_STEPS = 800" in demo, "the demo's TOTAL_STEPS changed: update my.py's replacement below"
    (folder / "my.py").write_text(demo.replace('JOB_NAME = "demo"', 'JOB_NAME = "my"')
                                  .replace("TOTAL_STEPS = 800", "TOTAL_STEPS = 3")
                                  .replace("max_text_bytes=3_000_000", "max_text_bytes=200_000"))
    raw = folder / "data/raw"
    raw.mkdir(parents=True)
    for name in ("json/encoder.py", "textwrap.py", "shutil.py"):
        (raw / Path(name).with_suffix(".txt").name).write_text(Path(sysconfig.get_paths()["stdlib"], name).read_text())
    (folder / "held_out").mkdir()
    (folder / "held_out/doc.txt").write_text((raw / "textwrap.txt").read_text())
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]  # enough text for 8000 pieces
    (folder / "corpus.txt").write_text("".join(p.read_text(errors="replace") for p in stdlib))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs")
    setup_folder(path)
    first = RUNS[next(iter(RUNS))]  # the README's demo, which the later commands use
    r = ok(sh(first.command, path, *first.extra))
    path.joinpath("demo.out").write_text(r.out)
    return path


def test_the_readme_demo_trains_and_writes_its_run_folder(folder):
    """The README's `spindle train` (4 steps here, the fixture's run): the seed's step line, metrics.jsonl, the
    resolved config, a checkpoint, TensorBoard events and the closing sample."""
    out, run = (folder / "demo.out").read_text(), folder / "runs" / "demo"
    lines = [line for line in out.splitlines() if line.startswith("tflops=")]
    assert len(lines) == 4 and "tgs (tokens/gpu/second)=" in lines[0] and ",loss=" in lines[0]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert metrics[0]["loss"] == pytest.approx(math.log(258), abs=0.3)  # uniform over the byte vocabulary at init
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert json.loads((run / "config.json").read_text())["JOB_NAME"] == "demo"
    assert (run / "ckpt" / "4.step").is_file() and (run / "ckpt" / "4" / ".metadata").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert "sample (temperature 0.8, top-p 0.95, 8 tokens;" in out


def test_every_command_block_is_tagged():
    untagged = [(doc.name, line.strip()) for doc in DOCS for tag, lines in blocks(doc.read_text())
                if tag not in SHELL_TAGS | {"python"} for line in lines if COMMAND_START.match(line)]
    assert not untagged, f"commands outside a ```bash block (tag the block so this test runs it): {untagged}"


def test_every_listed_command_is_still_in_the_docs():
    written = {cmd for _, cmd in doc_commands()}
    assert not (set(RUNS) | set(SKIPS)) - written


@pytest.mark.parametrize("doc, command", doc_commands(), ids=[c[:70] for _, c in doc_commands()])
def test_doc_command_runs_as_written(request, doc, command):
    if command in SKIPS:
        pytest.skip(f"{doc}: {SKIPS[command]}")
    folder = request.getfixturevalue("folder")  # after the skip: a skipped command does not wait for the demo
    assert command in RUNS, (f"{doc}: `{command}` is a new command: add it to RUNS (how it runs here and what it "
                             f"must print) or to SKIPS (why it cannot run here)")
    run = RUNS[command]
    if run is RUNS[next(iter(RUNS))]:
        out = (folder / "demo.out").read_text()  # run by the fixture
    else:
        if run.copy:
            shutil.copytree(folder / run.copy[0], folder / run.copy[1], dirs_exist_ok=True)
        r = ok(sh(run.command or command.replace(".venv/bin/python", "python").replace(".venv/bin/", ""),
                  folder, *run.extra))
        out = r.out
        if run.check:
            run.check(r.stdout)
    for line in (*run.expect, *shown_output(command)):
        assert line in out, f"{doc}: `{command}` did not print {line!r}:\n{out[-3000:]}"
