"""`eval ppl` / `eval passkey` / `generate` with ids beyond the checkpoint's vocabulary (issue 22, point 7):
a byte-level checkpoint (258 entries) read with the default sentencepiece tokenizer (1,024), or with token
files prepared by it, is one line naming both sizes and exit 2, not an IndexError traceback from the
embedding."""

import pytest

from spindle.cli import main as spindle

VOCAB_LINE = "outside the checkpoint's vocabulary of 258 entries"


@pytest.fixture(scope="module")
def byte_ckpt(tmp_path_factory):
    """A 1-layer byte-level model saved as a Spindle checkpoint (untrained: only its vocabulary matters)."""
    from spindle.checkpoint.manager import save_weights_checkpoint
    from spindle.config import validate_config
    from spindle.model.llama import build_model

    tmp = tmp_path_factory.mktemp("vocab")
    text = tmp / "text"
    text.mkdir()
    (text / "doc.txt").write_text("def f(x):\n    return x + 1\n" * 20)
    cfg = validate_config({"data": {"tokenizer_path": "byte", "seq_len": 32},
                           "model": {"hidden_size": 16, "num_attention_heads": 2, "num_layers": 1, "vocab_size": 258,
                                     "multiple_of": 16, "max_position_embeddings": 32}})
    save_weights_checkpoint(str(tmp / "ckpt"), 0, build_model(cfg.model.to_args()), cfg.to_dict())
    return tmp


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


EVAL = ["--lengths", "32", "--variants", "plain"]


def test_eval_ppl_with_a_bigger_tokenizer_is_one_line(byte_ckpt, capsys):
    args = ["eval", "ppl", "--ckpt", str(byte_ckpt / "ckpt"), "--data", str(byte_ckpt / "text"), *EVAL,
            "--windows", "1"]
    assert spindle(args) == 0  # its own tokenizer (byte) reads the same text
    capsys.readouterr()
    assert spindle(args + ["--tokenizer", "default"]) == 2
    err = one_error_line(capsys)
    assert "tokenizer.model (a vocabulary of 1,024)" in err and VOCAB_LINE in err and "--tokenizer" in err


def test_eval_ppl_with_token_files_of_another_tokenizer_is_one_line(byte_ckpt, capsys):
    toks = byte_ckpt / "toks"
    assert spindle(["prepare", str(byte_ckpt / "text"), "--out", str(toks), "--tokenizer", "default"]) == 0
    capsys.readouterr()
    assert spindle(["eval", "ppl", "--ckpt", str(byte_ckpt / "ckpt"), "--data", str(toks), *EVAL,
                    "--windows", "1"]) == 2
    err = one_error_line(capsys)
    assert f"--data {toks}" in err and "(token file)" in err and VOCAB_LINE in err and "prepare the data again" in err


@pytest.mark.parametrize("mode", ["generate", "teacher"])
def test_eval_passkey_with_a_bigger_tokenizer_is_one_line(byte_ckpt, capsys, mode):
    assert spindle(["eval", "passkey", "--ckpt", str(byte_ckpt / "ckpt"), "--tokenizer", "default", "--lengths", "128",
                    "--depths", "0", "--samples", "1", "--variants", "plain", "--mode", mode]) == 2
    err = one_error_line(capsys)
    assert "(a vocabulary of 1,024)" in err and VOCAB_LINE in err


def test_generate_with_a_bigger_tokenizer_is_one_line(byte_ckpt, capsys):
    assert spindle(["generate", "--ckpt", str(byte_ckpt / "ckpt"), "--tokenizer", "default", "--prompt", "import os",
                    "--max-new-tokens", "2"]) == 2
    assert VOCAB_LINE in one_error_line(capsys)


def test_check_ids_in_vocab_reads_lists_tensors_and_arrays():
    import numpy as np
    import torch

    from spindle.errors import SpindleError
    from spindle.eval.generate import check_ids_in_vocab

    for ids in ([0, 257], torch.tensor([[0, 257]]), np.array([0, 257], dtype="<u2"), []):
        check_ids_in_vocab(ids, 258, "x")
    for ids, bad in (([0, 258], "258"), (torch.tensor([[3, -1]]), "-1"), (np.array([70000], dtype="<u4"), "70,000")):
        with pytest.raises(SpindleError, match=f"x gives token id {bad}, outside"):
            check_ids_in_vocab(ids, 258, "x")
