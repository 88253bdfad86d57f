"""The one rule for folders commands write (spindle/outputs.py): refused over a user's files without
--overwrite, never over or around an input, published only when complete."""

import pytest

from spindle.errors import SpindleError
from spindle.outputs import StagedFolder, check_output


def test_existing_folder_needs_overwrite_and_an_input_is_never_a_target(tmp_path):
    check_output(str(tmp_path / "new"), [], False, "--out")
    (tmp_path / "empty").mkdir()
    check_output(str(tmp_path / "empty"), [], False, "--out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    with pytest.raises(SpindleError, match="--out .*not empty.*--overwrite"):
        check_output(str(tmp_path / "full"), [], False, "--out")
    check_output(str(tmp_path / "full"), [], True, "--out")
    src = tmp_path / "ckpt" / "6"
    src.mkdir(parents=True)
    for out, why in [(src, "is the input"), (src / "sub", "is inside the input folder"),
                     (tmp_path / "ckpt", "holds the input")]:
        with pytest.raises(SpindleError, match=why):
            check_output(str(out), [str(src)], True, "OUT")


def test_staged_folder_publishes_only_when_complete_and_keeps_other_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    (out / "ppl.json").write_text("old")
    with pytest.raises(RuntimeError):
        with StagedFolder(str(out), replaces={"ppl.json"}.__contains__, overwrite=True) as stage:
            (tmp_path / stage / "ppl.json").write_text("half")
            raise RuntimeError("interrupted")
    assert (out / "ppl.json").read_text() == "old"  # the failed run changed nothing
    with StagedFolder(str(out), replaces={"ppl.json", "ppl.png"}.__contains__, overwrite=True) as stage:
        (tmp_path / stage / "ppl.json").write_text("new")
        (tmp_path / stage / "sub").mkdir()
        (tmp_path / stage / "sub" / "x").write_text("1")
    assert (out / "ppl.json").read_text() == "new" and (out / "mine.txt").read_text() == "keep"
    assert (out / "sub" / "x").read_text() == "1"
    assert not list(tmp_path.glob(".out.*"))  # no staging folder, old folder or lock left
    with pytest.raises(SpindleError, match="not empty; pass --overwrite"):  # re-checked under the lock
        with StagedFolder(str(out), replaces={"ppl.json"}.__contains__):
            pass
