"""The long-context journey of docs/long-context.md §9: train the demo, then continue it at a new RoPE
base with configs/continue_rope.py as written (weights only), then evaluate the continued model."""

import pytest

from tests.journeys.shell import SMALL, ok, sh, steps, user_folder

pytestmark = pytest.mark.journeys


def test_demo_then_continue_rope_then_eval(tmp_path):
    folder = user_folder(tmp_path)
    ok(sh("spindle train", folder, "--set", "data.total_steps=2", *SMALL))
    r = ok(sh("spindle train --config configs/continue_rope.py", folder, "--set", "data.total_steps=2", *SMALL))
    assert "load_ckpt_info: loading model from" in r.out and "runs/demo/ckpt/2" in r.out
    assert steps(r.stdout) == [0, 1] and "done: 2 steps" in r.stdout  # a fresh schedule: weights only
    r = ok(sh("spindle eval ppl --ckpt runs/continue_rope/ckpt --lengths 256,512 --windows 1 --chunk 256", folder))
    assert "perplexity over the first L tokens" in r.out
