"""Tokenizer interface: sentencepiece, HF tokenizer.json, bytes; loading, training, errors."""

from __future__ import annotations

import hashlib
import json

import pytest

from spindle.cli import main as cli_main
import tokenizer_folders as hub  # tests/ is on sys.path (conftest.py)

from spindle.data import tokenizer as tkmod
from spindle.data.tokenizer import ByteTokenizer, load_tokenizer
from spindle.data.tokenizer_train import train_tokenizer
from spindle.errors import SpindleError

TEXT = "\n".join(
    f"def func_{i}(x, y):\n    return x * {i} + y  # comment {i % 7}\nclass K{i % 5}: pass" for i in range(400)
) + "\nstates_<s>[<t>] </s> hello world\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "train.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def sp_tok(corpus, tmp_path_factory):
    return train_tokenizer([corpus], 320, tmp_path_factory.mktemp("sp"), num_threads=1)


@pytest.fixture(scope="module")
def hf_tok(corpus, tmp_path_factory):
    return train_tokenizer([corpus], 320, tmp_path_factory.mktemp("hf"), kind="bpe")


def test_byte_tokenizer():
    t = load_tokenizer("byte")
    assert isinstance(t, ByteTokenizer)
    assert (t.vocab_size, t.bos_id, t.eos_id) == (258, 256, 257)
    assert t.encode("a<s>é") == list("a<s>é".encode())
    assert t.decode(t.encode("héllo\n")) == "héllo\n"
    assert t.identity()["kind"] == "byte" and t.identity()["sha256"] is None


@pytest.mark.parametrize("which", ["sp", "hf"])
def test_trained_tokenizers(which, sp_tok, hf_tok, tmp_path):
    t = sp_tok if which == "sp" else hf_tok
    assert t.vocab_size == 320
    s = "def func_3(x, y):\n    return x\t+  y\n"
    ids = t.encode(s)
    assert t.bos_id not in ids and t.eos_id not in ids  # no special tokens added
    assert t.decode(ids) == s  # lossless (identity normalisation / byte level)
    # Literal special-token text stays text: never becomes BOS/EOS (no injection from data).
    lit = t.encode("states_<s>[<t>] </s>")
    assert t.bos_id not in lit and t.eos_id not in lit
    assert t.decode(lit) == "states_<s>[<t>] </s>"
    texts = ["a", "", "def f():", "x = 1  # y"]
    assert t.encode_batch(texts, num_threads=2) == [t.encode(x) for x in texts]
    ident = t.identity()
    assert ident["vocab_size"] == 320 and ident["kind"] == t.kind
    assert ident["sha256"] == hashlib.sha256(open(t.path, "rb").read()).hexdigest()
    # save -> load from the folder gives the same tokenizer
    t.save(tmp_path)
    t2 = load_tokenizer(str(tmp_path))
    assert t2.kind == t.kind and t2.encode(s) == ids and (t2.bos_id, t2.eos_id) == (t.bos_id, t.eos_id)


def test_sp_concatenation_roundtrips(sp_tok):
    # No dummy prefix: segments encoded separately decode to their concatenation.
    a, b = "<|User|>:hi\n", "<|Bot|>:x"
    assert sp_tok.decode(sp_tok.encode(a) + sp_tok.encode(b)) == a + b


def test_load_by_file_path(sp_tok, hf_tok):
    assert load_tokenizer(sp_tok.path).kind == "sentencepiece"
    assert load_tokenizer(hf_tok.path).kind == "hf"


def test_default(monkeypatch, sp_tok, tmp_path):
    monkeypatch.setattr(tkmod, "DEFAULT_TOKENIZER_PATH", tmp_path / "missing.model")
    with pytest.raises(SpindleError, match="missing.model"):
        load_tokenizer("default")
    monkeypatch.setattr(tkmod, "DEFAULT_TOKENIZER_PATH", type(tmp_path)(sp_tok.path))
    assert load_tokenizer("default").identity()["sha256"] == sp_tok.identity()["sha256"]


def test_bad_paths(tmp_path):
    with pytest.raises(SpindleError, match="nope.model"):
        load_tokenizer(str(tmp_path / "nope.model"))
    bad = tmp_path / "garbage.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(SpindleError, match="garbage.model"):
        load_tokenizer(str(bad))
    badj = tmp_path / "tokenizer.json"
    badj.write_text("{oops")
    with pytest.raises(SpindleError, match="tokenizer.json"):
        load_tokenizer(str(badj))
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(SpindleError, match="emptydir"):
        load_tokenizer(str(empty))
    with pytest.raises(SpindleError, match="missing.txt"):
        train_tokenizer([str(tmp_path / "missing.txt")], 400, tmp_path / "o")


def test_tokenizer_main(corpus, tmp_path, capsys):
    rc = cli_main(["tokenizer", "train", str(corpus), "--vocab-size", "320", "--out", str(tmp_path / "t")])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 320
    assert load_tokenizer(str(tmp_path / "t")).vocab_size == 320
    assert cli_main(["tokenizer", "info", str(tmp_path / "none")]) == 2
    assert "none" in capsys.readouterr().err


def one_line(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


def test_tokenizer_train_never_overwrites(corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    assert cli_main(["tokenizer", "train", str(corpus), "--vocab-size", "320", "--out", str(out)]) == 0
    capsys.readouterr()
    (out / "README.txt").write_text("my notes")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert cli_main(["tokenizer", "train", str(corpus), "--vocab-size", "330", "--out", str(out)]) == 2
    one_line(capsys, f"--out {out}: already exists and is not empty", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # --overwrite with another kind: the old sentencepiece files go (they would win on load), notes stay
    assert cli_main(["tokenizer", "train", str(corpus), "--vocab-size", "330", "--out", str(out), "--kind", "bpe",
                           "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "tokenizer.json", "tokenizer_config.json"]
    assert load_tokenizer(str(out)).kind == "hf" and (out / "README.txt").read_text() == "my notes"
    # never into the folder of its own input
    assert cli_main(["tokenizer", "train", str(corpus), "--vocab-size", "320", "--out", str(corpus.parent),
                           "--overwrite"]) == 2
    one_line(capsys, f"--out {corpus.parent}: holds the input {corpus}")


@pytest.mark.parametrize("args,expected", [
    (["--vocab-size", "-5"], "argument --vocab-size: expected an integer in [300, 16777216], got -5"),
    (["--vocab-size", str(10**12)], "argument --vocab-size: expected an integer in [300, 16777216], got 1000000000000"),
    (["--vocab-size", "3e4"], "argument --vocab-size: expected an integer in [300, 16777216], got '3e4'"),
    (["--vocab-size", "320", "--kind", "wordpiece"], "argument --kind: invalid choice: 'wordpiece'"),
    (["--vocab-size", "320", "--out", ""], "argument --out: expected a path"),
    ([], "the following arguments are required: --vocab-size"),
])
def test_tokenizer_train_options_are_validated(corpus, tmp_path, capsys, args, expected):
    argv = ["train", str(corpus), "--out", str(tmp_path / "t")] + args
    assert cli_main(["tokenizer"] + argv) == 2
    one_line(capsys, expected)
    assert not (tmp_path / "t").exists()


def test_tokenizer_train_bad_inputs_are_one_line(tmp_path, capsys):
    empty, noise = tmp_path / "empty.txt", tmp_path / "noise.txt"
    empty.write_text("")
    noise.write_bytes(bytes(range(256)) * 4)
    for files, needle in (([tmp_path / "missing.txt"], "missing.txt: training file not found"),
                          ([empty], "sentencepiece training failed on"), ([noise], "sentencepiece training failed on")):
        assert cli_main(["tokenizer", "train", *map(str, files), "--vocab-size", "300",
                         "--out", str(tmp_path / "t")]) == 2
        one_line(capsys, needle)
    assert not (tmp_path / "t").exists() and not list(tmp_path.glob(".t.partial-*"))
    with pytest.raises(SpindleError, match="vocab"):
        train_tokenizer([str(noise)], 10**12, tmp_path / "t")  # the API checks too, before sentencepiece


# ------------------------------------------------------------------------------ folders as the Hub ships them

def test_qwen2_folder_has_no_bos(tmp_path):
    tok = load_tokenizer(hub.qwen2(tmp_path / "qwen2"))
    assert tok.kind == "hf" and tok.bos_id is None  # not <|im_start|>: Qwen2 has no BOS
    assert tok.eos_id == tok.special_tokens()["<|im_end|>"]
    assert tok.chat_template == hub.QWEN2_TEMPLATE
    ids = tok.encode("hello world")
    assert tok.document(ids) == ids + [tok.eos_id]
    assert tok.identity()["bos_id"] is None
    assert set(tok.special_tokens()) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}


def test_llama3_folder_and_its_tiktoken_original(tmp_path):
    folder = hub.llama3(tmp_path / "llama3")
    tok = load_tokenizer(folder)
    sp = tok.special_tokens()
    assert tok.kind == "hf" and (tok.bos_id, tok.eos_id) == (sp["<|begin_of_text|>"], sp["<|eot_id|>"])
    assert tok.chat_template == hub.LLAMA3_TEMPLATE  # from chat_template.jinja
    for spec in (folder / "original", folder / "original" / "tokenizer.model"):
        with pytest.raises(SpindleError, match=r"tokenizer.model: a tiktoken BPE file .* not read; point at the "
                                               r"Hub folder that holds tokenizer.json"):
            load_tokenizer(spec)
    # a folder with both: the tiktoken tokenizer.model is not taken for sentencepiece
    (folder / "original" / "tokenizer.model").rename(folder / "tokenizer.model")
    assert load_tokenizer(folder).kind == "hf"


def test_internlm2_folder_loads_without_remote_code(tmp_path):
    folder = hub.internlm2(tmp_path / "internlm2")
    tok = load_tokenizer(folder)
    assert tok.kind == "sentencepiece" and (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.chat_template == hub.INTERNLM2_TEMPLATE
    sp = tok.special_tokens()
    assert {"<s>", "</s>", "<|im_start|>", "<|im_end|>"} <= set(sp) and tok.token_text(sp["<|im_end|>"]) == "<|im_end|>"
    assert not (folder / "REMOTE_CODE_RAN").exists()


def test_declared_specials_win_and_must_exist(tmp_path):
    folder = hub.qwen2(tmp_path / "q")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg | {"bos_token": "<|endoftext|>"}))
    tok = load_tokenizer(folder)
    assert tok.bos_id == tok.special_tokens()["<|endoftext|>"]
    (folder / "tokenizer_config.json").write_text(
        json.dumps(cfg | {"bos_token": "<|endoftext|>", "add_bos_token": False}))
    assert load_tokenizer(folder).bos_id is None  # add_bos_token: false -> documents start without one
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg | {"eos_token": {"content": "<|nope|>"}}))
    with pytest.raises(SpindleError, match=r"tokenizer.json: eos_token '<\|nope\|>' of tokenizer_config.json is not"):
        load_tokenizer(folder)
    # only special_tokens_map.json (older folders)
    (folder / "tokenizer_config.json").unlink()
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    tok = load_tokenizer(folder)
    assert tok.eos_id == tok.special_tokens()["<|endoftext|>"] and tok.bos_id is None and tok.chat_template is None
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "vocab.json").write_text("{}")
    with pytest.raises(SpindleError, match="vocab.json \\+ merges.txt alone are the slow format"):
        load_tokenizer(tmp_path / "slow")


def test_prepare_wraps_documents_without_bos(tmp_path):
    from spindle.data.prepare import prepare
    from spindle.data.shards import open_documents

    folder = hub.qwen2(tmp_path / "qwen2")
    tok = load_tokenizer(folder)
    (tmp_path / "in.txt").write_text("hello world\nthe answer is 4.\n")
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        prepare([str(tmp_path / "in.txt")], str(out), str(folder), workers=workers, progress=False, min_length=3)
        docs = [d.tolist() for d, _ in open_documents(str(out))]
        assert docs == [tok.encode("hello world") + [tok.eos_id], tok.encode("the answer is 4.") + [tok.eos_id]]
