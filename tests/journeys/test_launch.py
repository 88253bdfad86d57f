"""Journeys 1, 2 and 5: the seed's launch line from a fresh folder, with the micro-batch counts and rampup the
seed uses, and with a typo in it.

Each layout InternEvo accepts is proven on tests/distributed/tiny.py by tests/distributed/test_parity.py (the
single process's losses and closing sample under plain, dp2_zero1 = zero1=-1, tp2, tp2_sp, pp2_1f1b,
pp2_interleaved = num_chunks=2, ...; micro_num=1 under two stages: test_pipeline_takes_the_micro_batch_counts_
internevo_accepts): one launch here is the seed's line as typed, under a pipeline layout whose rampup starts
at the seed's micro_num=1."""

import pytest

from tests.journeys.shell import closing_sample, ok, seed_launch, sh, steps, user_folder

pytestmark = [pytest.mark.journeys, pytest.mark.dist]


def test_seed_launch_line_under_pipeline_with_rampup(tmp_path):
    # a fresh folder: both ranks meet an empty text cache (the race a fresh run hits)
    # InternEvo's "start incr every": micro_num 1, 2, 2 over the three steps, through the 2-stage schedule
    r = ok(seed_launch(user_folder(tmp_path), "data.total_steps=3", "data.micro_num=2",
                       "data.rampup_batch_size=1 1 1", "parallel.pipeline.size=2"))
    assert steps(r.stdout) == [0, 1, 2], r.stdout  # rank 0 alone prints the step lines
    assert "world size 2" in r.stdout
    micro = [l.split(",micro_num=")[1].split(",")[0] for l in r.stdout.splitlines() if l.startswith("tflops=")]
    assert micro == ["1", "2", "2"], r.stdout  # the seed's micro_num=1 under 2 stages runs, then more
    closing_sample(r.stdout)
    assert (tmp_path / "runs" / "demo" / "ckpt" / "3.step").is_file()


def test_a_typo_in_the_launch_line_is_one_line_from_one_rank(tmp_path):
    r = seed_launch(user_folder(tmp_path), "model.num_layerz=2")
    assert r.returncode != 0  # torchrun exits 1 when a worker fails; the worker's own code is in its report
    assert "exitcode  : 2" in r.stderr
    errors = [l for l in r.out.splitlines() if "spindle: error:" in l]
    assert errors == ["spindle: error: ./configs/demo.py (with --set overrides): model.num_layerz: unknown key; "
                      "did you mean 'model.num_layers'?"], r.out
    # torchrun prints its own traceback of the launch; none comes from spindle
    assert "/spindle/" not in r.out and 'File "' + str(tmp_path / "train.py") not in r.out
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_a_bad_value_on_the_one_process_line_is_one_line_exit_2(tmp_path):
    r = sh("python train.py --config ./configs/demo.py --set data.micro_bsz=x", user_folder(tmp_path))
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == ["spindle: error: ./configs/demo.py (with --set overrides): data.micro_bsz: "
                                     "expected an integer, not a str (got 'x')"]
