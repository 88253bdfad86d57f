"""Journey 3: the stop file as InternEvo users use it, then the restarts a user makes: the stop file is
acted on once, a restart continues to total_steps, and a rerun of the finished job says so."""

import pytest

from tests.journeys.shell import SMALL, closing_sample, ok, sh, steps, user_folder

pytestmark = pytest.mark.journeys

RUN = ("python train.py --config ./configs/demo.py --set data.total_steps=6 ckpt.stop_file_path=stop "
       "ckpt.auto_resume=True " + " ".join(SMALL))


def test_stop_file_once_then_restart_to_total_steps_then_already_there(tmp_path):
    folder = user_folder(tmp_path)
    (folder / "stop").write_text("3\n")  # "save and quit at step 3", written before the launch
    first = ok(sh(RUN, folder))
    assert steps(first.stdout) == [0, 1, 2]
    assert "stop file stop: asked to stop at step 3; stopping at step 3 (checkpoint saved at step 3)" in first.out
    assert (folder / "stop").read_text().strip() == "0"  # reset: acted on once
    again = ok(sh(RUN, folder))
    assert "auto_resume: continuing from" in again.out and "(step 3, all state)" in again.out
    assert steps(again.stdout) == [3, 4, 5] and "stop file" not in again.out
    closing_sample(again.stdout)
    done = ok(sh(RUN, folder))
    assert steps(done.stdout) == []
    assert ("already at data.total_steps=6 (the run resumed at step 6): nothing to train; raise "
            "data.total_steps to train further") in done.stdout


def test_stop_file_with_saving_off_says_nothing_was_saved(tmp_path):
    folder = user_folder(tmp_path)
    (folder / "stop").write_text("2\n")
    r = ok(sh("python train.py --config ./configs/demo.py --set data.total_steps=4 ckpt.stop_file_path=stop "
              "ckpt.enable_save_ckpt=False " + " ".join(SMALL), folder))
    assert steps(r.stdout) == [0, 1]
    assert ("stop file stop: asked to stop at step 2; stopping at step 2 (saving is off "
            "(ckpt.enable_save_ckpt=False), so nothing was saved)") in r.out
    assert not (folder / "runs/demo/ckpt").exists()
