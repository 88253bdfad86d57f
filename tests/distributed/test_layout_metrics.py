"""Pipeline and tensor parallelism report what a single process reports: per-source loss / accuracy /
tokens of every step and the validation loss, on real source folders prepared with tools/tokenizer.py
(gloo, torchrun). Pipelines compute them on the last stage inside the schedule (validation through its
forward-only pass); tensor parallelism from vocabulary-sharded logits."""

import pytest

from distributed.marks import layouts

pytestmark = pytest.mark.dist


# pp2_1f1b, pp2_interleaved, tp2_sp, dp2 on 2 processes, pp2_cp2 on 4 (layout_runs.JOBS["ppm_..."])
@pytest.mark.parametrize("name", layouts(["pp2_1f1b", "pp2_interleaved", "tp2_sp", "pp2_cp2", "dp2"],
                                         runs=lambda name: ("ppm_single", f"ppm_{name}")))
def test_layout_reports_sources_and_validation(layout_runs, name):
    records, reference = layout_runs[f"ppm_{name}"].records, layout_runs["ppm_single"].records
    assert [r["step"] for r in records] == [r["step"] for r in reference] == [0, 1, 2, 3]
    def reported(record):
        return {k for k in record if k.split("/")[0] in ("loss", "acc", "tokens")}

    assert {"loss/code", "loss/en", "tokens/code", "tokens/en"} <= set().union(*map(reported, reference))
    for ours, ref in zip(records, reference):
        assert reported(ours) == reported(ref)
        for k in reported(ref):
            assert ours[k] == pytest.approx(ref[k], abs=1e-4), (ours["step"], k)
    # validation after steps 2 and 4 (valid_every=2): the whole folder, 3 micro-batches an evaluation call through a
    # 2-micro-batch schedule; accuracy from the vocabulary shards under tp2 (a max over the tensor-parallel ranks)
    val = [(r["step"], r["val/held_loss"], r["val/held_acc"]) for r in records if "val/held_loss" in r]
    ref_val = [(r["step"], r["val/held_loss"], r["val/held_acc"]) for r in reference if "val/held_loss" in r]
    assert [s for s, *_ in val] == [s for s, *_ in ref_val] == [1, 3]
    for (_, a, acc), (_, b, ref_acc) in zip(val, ref_val):
        assert a == pytest.approx(b, abs=1e-4) and acc == pytest.approx(ref_acc, abs=1e-4)
    assert ref_val[1][1] < ref_val[0][1]  # it learns the held-out text's statistics
    assert 0 < ref_val[1][2] < 1
