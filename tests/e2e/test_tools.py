"""tools/tokenizer.py and tools/alpaca_tokenizer.py run as users run them: by path, from elsewhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from spindle.data.shards import open_documents

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_TOOL = ROOT / "tools" / "tokenizer.py"
ALPACA_TOOL = ROOT / "tools" / "alpaca_tokenizer.py"


def run(tool, *args, cwd):
    return subprocess.run([sys.executable, str(tool), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def one_line_error(p, *needles):
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_tokenizer_tool_seed_layout(tmp_path):
    src = tmp_path / "raw.txt"
    src.write_text("hello world\n\n  second doc  \n", encoding="utf-8")
    out = tmp_path / "cn" / "output.bin"
    p = run(TOKENIZER_TOOL, "--text_input_path", src, "--bin_output_path", out, "--tokenizer", "byte",
            cwd=tmp_path.parent)
    assert p.returncode == 0, p.stderr
    docs = [[256, *b"hello world", 257], [256, *b"second doc", 257]]
    expected = b"".join((json.dumps({"tokens": d}) + "\n").encode() for d in docs)
    assert out.read_bytes() == expected
    meta = np.load(str(out) + ".meta")
    assert meta.dtype == np.int64 and meta.tolist() == [[0, len(docs[0])], [expected.index(b"\n") + 1, len(docs[1])]]
    assert [x[0].tolist() for x in open_documents(str(out))] == docs  # our reader reads the tool's files
    # refuses to touch existing output without --overwrite
    p = run(TOKENIZER_TOOL, "--text_input_path", src, "--bin_output_path", out, "--tokenizer", "byte", cwd=tmp_path)
    one_line_error(p, "output.bin", "--overwrite")
    assert out.read_bytes() == expected
    p = run(TOKENIZER_TOOL, "--text_input_path", src, "--bin_output_path", out, "--tokenizer", "byte", "--overwrite",
            cwd=tmp_path)
    assert p.returncode == 0 and out.read_bytes() == expected


def test_tokenizer_tool_bad_inputs(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\nbad \xc3\x28 byte\n")
    p = run(TOKENIZER_TOOL, "--text_input_path", bad, "--bin_output_path", tmp_path / "o.bin", "--tokenizer", "byte",
            cwd=tmp_path)
    one_line_error(p, "bad.txt", "line 2", "UTF-8")
    assert not (tmp_path / "o.bin").exists()
    nokey = tmp_path / "r.jsonl"
    nokey.write_text('{"content": "x"}\n')
    p = run(TOKENIZER_TOOL, "--text_input_path", nokey, "--bin_output_path", tmp_path / "o.bin", "--tokenizer", "byte",
            cwd=tmp_path)
    one_line_error(p, "r.jsonl", "line 1", "'text'")
    p = run(TOKENIZER_TOOL, "--text_input_path", nokey, "--bin_output_path", tmp_path / "o.bin", "--tokenizer", "byte",
            "--text_key", "content", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    p = run(TOKENIZER_TOOL, "--text_input_path", tmp_path / "missing.txt", "--bin_output_path", tmp_path / "m.bin",
            "--tokenizer", "byte", cwd=tmp_path)
    one_line_error(p, "missing.txt")
    p = run(TOKENIZER_TOOL, "--text_input_path", nokey, "--bin_output_path", tmp_path / "t.bin",
            "--tokenizer", tmp_path / "nope.model", cwd=tmp_path)
    one_line_error(p, "nope.model")


ALPACA = [
    {"instruction": "Add", "input": "1 2", "output": "3"},
    {"instruction": "Hi", "input": "", "output": "hello"},
] + [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(18)]


def test_alpaca_tool(tmp_path):
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps(ALPACA))
    out = tmp_path / "out"
    p = run(ALPACA_TOOL, src, out, "byte", "--split_ratio", "0.1", cwd=tmp_path.parent)
    assert p.returncode == 0, p.stderr
    train = open_documents(str(out / "train" / "en" / "dataset.bin"))
    valid = open_documents(str(out / "valid" / "en" / "dataset.bin"))
    assert (len(train), len(valid)) == (18, 2)  # without replacement: exactly int(n * ratio)
    assert np.load(str(out / "train" / "en" / "dataset.bin.meta")).dtype == np.int64
    # the stored file carries InternEvo's negative ids; the reader turns them into a mask
    raw = json.loads((out / "train" / "en" / "dataset.bin").read_text().splitlines()[0])["tokens"]
    assert raw[0] == 256 and any(t < 0 for t in raw) and raw[-1] == 257
    seen = set()
    for split in (train, valid):
        for i in range(len(split)):
            toks, mask = split[i]
            text = bytes(t for t in toks.tolist() if t < 256).decode()
            trained = bytes(t for t, m in zip(toks.tolist(), mask.tolist()) if m and t < 256).decode()
            rec = next(r for r in ALPACA if text.startswith(f"<|User|>:{r['instruction']}\n") or
                       text.startswith(f"<|User|>:{r['instruction']}<|Bot|>"))
            prompt = (f"<|User|>:{rec['instruction']}\n{rec['input']}" if rec.get("input")
                      else f"<|User|>:{rec['instruction']}")
            assert text == prompt + "\n<|Bot|>:" + rec["output"] + "\n"
            assert trained == rec["output"] + "\n"  # loss only on the response (+ EOS)
            assert mask[-1] and not mask[1]
            seen.add(rec["instruction"])
    assert len(seen) == len(ALPACA)
    p = run(ALPACA_TOOL, src, out, "byte", cwd=tmp_path)
    one_line_error(p, "output_path", str(out), "--overwrite")


def test_alpaca_tool_chat_and_errors(tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "ok"},
    ]}) + "\n")
    p = run(ALPACA_TOOL, chat, tmp_path / "c", "byte", "--split_ratio", "0", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    toks, mask = open_documents(str(tmp_path / "c" / "train" / "en" / "dataset.bin"))[0]
    trained = bytes(t for t, m in zip(toks.tolist(), mask.tolist()) if m and t < 256).decode()
    assert trained == "yo\nok\n"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "x", "output": "y"}, {"instruction": "z"}]))
    one_line_error(run(ALPACA_TOOL, bad, tmp_path / "b", "byte", cwd=tmp_path), "bad.json", "record 1", "output")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": []}\n{oops\n')
    one_line_error(run(ALPACA_TOOL, broken, tmp_path / "b", "byte", cwd=tmp_path), "broken.jsonl", "line 2")


def test_tools_validate_options_and_never_write_into_their_inputs(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text("hello\n")
    for args, needles in (
        (["--workers", "0"], ["argument --workers: expected an integer in [1, 1024], got 0"]),
        (["--text_key", ""], ["argument --text_key: expected a non-empty name"]),
        (["--bin_output_path", raw / "x.bin"], [f"--bin_output_path {raw / 'x.bin'}: is inside the input folder"]),
    ):
        base = {"--text_input_path": raw, "--bin_output_path": tmp_path / "o.bin", "--tokenizer": "byte"}
        base.update(dict(zip(args[::2], args[1::2])))
        one_line_error(run(TOKENIZER_TOOL, *[x for kv in base.items() for x in kv], cwd=tmp_path), *needles)
    assert sorted(p.name for p in raw.iterdir()) == ["a.txt"] and not (tmp_path / "o.bin").exists()
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps(ALPACA))
    for extra, needles in ((["--split_ratio", "nan"], ["argument --split_ratio: expected a number in [0, 1), got nan"]),
                           (["--split_ratio", "1"], ["argument --split_ratio"]),
                           (["--max_length", "1"], ["argument --max_length: expected an integer in [2, "]),
                           (["--seed", "-1"], ["argument --seed"])):
        one_line_error(run(ALPACA_TOOL, src, tmp_path / "sft", "byte", *extra, cwd=tmp_path), *needles)
    assert not (tmp_path / "sft").exists()
    one_line_error(run(ALPACA_TOOL, src, tmp_path, "byte", "--overwrite", cwd=tmp_path),
                   f"output_path {tmp_path}: holds the input")


def test_alpaca_tool_renders_with_the_tokenizers_chat_template(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    import tokenizer_folders as hub

    from spindle.data.tokenizer import load_tokenizer

    folder = hub.qwen2(tmp_path / "qwen2")
    tok = load_tokenizer(folder)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                             {"role": "user", "content": "more"},
                                             {"role": "assistant", "content": "ok"}]}) + "\n")
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Add", "input": "1 2", "output": "3"}]))
    for src, trained_want, text_want in (
        (chat, "yo<|im_end|>\nok<|im_end|>\n",
         "<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"),
        (alpaca, "3<|im_end|>\n", "<|im_start|>user\nAdd\n1 2<|im_end|>\n<|im_start|>assistant\n3<|im_end|>\n"),
    ):
        out = tmp_path / src.stem
        p = run(ALPACA_TOOL, src, out, folder, "--split_ratio", "0", cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        toks, mask = open_documents(str(out / "train" / "en" / "dataset.bin"))[0]
        assert tok.decode(toks.tolist()).endswith(text_want)
        assert tok.decode(toks.tolist()).startswith("<|im_start|>system\n")  # no BOS: Qwen2 has none
        assert tok.decode([t for t, m in zip(toks.tolist(), mask.tolist()) if m]) == trained_want
