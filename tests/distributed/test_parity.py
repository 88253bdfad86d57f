"""Every parallel layout reproduces the single-process losses on the same global batch (gloo, torchrun), and
ends with the single process's closing sample (the model gathered whole under its layout).

The single-process reference takes micro_num * dp micro-batches per step: the global sampler hands
data-parallel rank r the r-th slice of the same consecutive packs, so both see identical data. The runs are
tests/distributed/layout_runs.py's (one launch per world size, the reference trained once per session).
"""

import pytest

from distributed.layout_runs import LAYOUTS, PACKED, PACKED_BATCH, REFERENCE, TINY
from distributed.marks import layouts, needs_pipeline_torch
from distributed.parity_checks import closing_sample, within

pytestmark = pytest.mark.dist


def reference_of(name: str) -> str:
    return REFERENCE.get(name, "single")


@pytest.mark.parametrize("name", layouts(LAYOUTS, runs=lambda name: (reference_of(name), name)))
def test_layout_matches_single_process(layout_runs, name):
    losses, reference = layout_runs[name].losses, layout_runs[reference_of(name)].losses
    assert within(losses, reference), f"{name}: {losses} vs {reference}"
    assert reference[-1] < reference[0]


@pytest.mark.parametrize("name", layouts(LAYOUTS, runs=lambda name: (reference_of(name), name)))
def test_layout_ends_with_the_single_process_sample(layout_runs, name):
    """Spindle gathers the whole model on rank 0 for the sample (tensor shards, pipeline stages, FSDP shards):
    with the same weights (to 1e-4) and the same seed it samples what one process samples."""
    reference = closing_sample(layout_runs[reference_of(name)].stdout)
    assert reference.startswith("import ") and len(reference) > len("import ")  # something was generated
    assert closing_sample(layout_runs[name].stdout) == reference


@pytest.mark.parametrize("name", [
    pytest.param("micro_num_1", marks=pytest.mark.runs("micro_num_1_single", "micro_num_1_pp2")),
    pytest.param("rampup", marks=pytest.mark.runs("rampup_single", "rampup_pp2")),  # micro_num 1, 2, 3, 4
])
@needs_pipeline_torch
def test_pipeline_takes_the_micro_batch_counts_internevo_accepts(layout_runs, name):
    single, staged = layout_runs[f"{name}_single"].losses, layout_runs[f"{name}_pp2"].losses
    assert within(staged, single), (staged, single)


@pytest.mark.runs("packed_single", "packed_cp2")
def test_context_parallel_on_packed_rows_with_documents_across_the_rank_boundary(layout_runs, tmp_path):
    """Random document lengths (16 .. 512 tokens) packed into 32-token rows: documents start and end inside
    the rows, and under head-tail slicing (rank 0 holds tokens [0, 8) and [24, 32), rank 1 [8, 24)) they
    span both ranks. Two context ranks give the one-process losses."""
    import torch

    from spindle.config import load_config
    from spindle.data.loader import build_train_loader
    from spindle.parallel.context import balanced_indices

    cfg = load_config(TINY, [PACKED, PACKED_BATCH])  # what packed_single and packed_cp2 train on
    loader = build_train_loader(cfg.data, cfg.model.vocab_size, tmp_path / "cache", prefetch=False)
    length = cfg.data.seq_len
    owner = torch.zeros(length, dtype=torch.long)
    owner[balanced_indices(1, 2, length)] = 1
    starts = crossing = 0
    for step in range(10):
        for b in loader.next_step(step):
            for row in b.position_ids:
                doc = torch.cumsum((row == 0).long(), 0)
                starts += int((row[1:] == 0).sum())  # a document begins inside the row
                # documents of this row with tokens on both ranks, one of them not the whole row
                crossing += sum(len(set(owner[doc == d].tolist())) == 2 and int((doc == d).sum()) < length
                                for d in doc.unique().tolist())
    loader.close()
    assert starts >= 10 and crossing >= 10, (starts, crossing)
    single, cp = layout_runs["packed_single"].losses, layout_runs["packed_cp2"].losses
    assert within(cp, single), (cp, single)


@pytest.mark.parametrize("name", [
    pytest.param("dp2", marks=pytest.mark.runs("le_single", "le_dp2")),  # rank 0 evaluates the training model
    pytest.param("cp2", marks=pytest.mark.runs("le_single", "le_cp2")),  # a plain copy (whole_model): CP gathers
])
def test_long_context_metrics_under_two_ranks(layout_runs, name):
    single, layout = layout_runs["le_single"].records, layout_runs[f"le_{name}"]
    names = {"val/ppl@32", "val/ppl@96", "val/ppl@32/yarn", "val/ppl@96/yarn", "val/passkey@256",
             "val/passkey@256/yarn"}
    records = layout.records
    assert [sorted(names & set(r)) for r in records] == [sorted(names) if r["step"] in (4, 9) else [] for r in records]
    for a, b in zip(single, records):
        for k in names & set(a):
            assert b[k] == pytest.approx(a[k], rel=1e-4), (k, a[k], b[k])
    assert layout.stdout.count("long-context eval after step") == 2  # rank 0 prints once per evaluation
