"""The global sampler: permutation per epoch, source weights, resume, data-parallel size, rampup."""

import numpy as np
import pytest

from spindle.config import DataConfig
from spindle.data.loader import Source, TrainLoader
from spindle.data.sampler import GlobalSampler, micro_num_at, position_at


class ListDocs:
    def __init__(self, docs):
        self.docs = [np.asarray(d, dtype=np.int64) for d in docs]
        self.lengths = np.array([len(d) for d in self.docs], dtype=np.int64)

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, i):
        return self.docs[i], None


def test_index_is_a_permutation_per_epoch():
    s = GlobalSampler([5, 7, 3], seed=11)
    e0 = [s.index(p) for p in range(15)]
    e1 = [s.index(p) for p in range(15, 30)]
    assert sorted(e0) == list(range(15)) and sorted(e1) == list(range(15))
    assert e0 != e1  # each epoch has its own order
    assert e0 == [GlobalSampler([5, 7, 3], seed=11).index(p) for p in range(15)]  # pure function of (seed, pos)
    assert e0 != [GlobalSampler([5, 7, 3], seed=12).index(p) for p in range(15)]


def test_weighted_sources_follow_their_weights():
    sizes, weights = [50, 50, 50], [0.6, 0.3, 0.1]
    s = GlobalSampler(sizes, seed=3, weights=weights)
    n = 6000
    idx = np.array([s.index(p) for p in range(n)])
    src = np.searchsorted(s.offsets, idx, side="right") - 1
    frac = np.bincount(src, minlength=3) / n
    assert np.allclose(frac, weights, atol=0.02), frac
    # within a source, draws walk a permutation of its packs: the first 50 draws of source 2 are distinct
    firsts = idx[src == 1][:50] - 50
    assert sorted(firsts.tolist()) == list(range(50))
    # zero weight: never drawn
    z = GlobalSampler(sizes, seed=3, weights=[1.0, 0.0, 1.0])
    assert not any(50 <= z.index(p) < 100 for p in range(500))


def make_loader(micro_num, dp_rank=0, dp_size=1, rampup="", weights=None):
    rng = np.random.default_rng(0)
    docs = ListDocs([rng.integers(0, 1000, size=int(n)) for n in rng.integers(3, 40, size=80)])
    docs2 = ListDocs([rng.integers(0, 1000, size=int(n)) for n in rng.integers(3, 40, size=40)])
    data = DataConfig(seq_len=8, micro_bsz=2, micro_num=micro_num, rampup_batch_size=rampup, seed=9,
                      source_weights=weights or {})
    return TrainLoader([Source("a", 0, docs), Source("b", 1, docs2)], data, dp_rank, dp_size, prefetch=False)


def ids(batch):
    return [tuple(mb.input_ids.flatten().tolist()) for mb in batch]


def test_resume_from_a_saved_position_gives_the_same_sequence():
    full = make_loader(3)
    want = [ids(full.next_step(s)) for s in range(8)]
    first = make_loader(3)
    got = [ids(first.next_step(s)) for s in range(3)]
    state = first.state_dict()
    assert state == {"position": 9}
    resumed = make_loader(3)
    resumed.load_state_dict(state)
    got += [ids(resumed.next_step(s)) for s in range(3, 8)]
    assert got == want


@pytest.mark.parametrize("weights", [None, {"a": 2.0, "b": 1.0}])
def test_dp1_vs_dp2_union_of_ranks_equals_the_single_rank_step(weights):
    single = make_loader(4, weights=weights)
    ranks = [make_loader(2, r, 2, weights=weights) for r in range(2)]
    for step in range(6):
        one = ids(single.next_step(step))
        two = [ids(r.next_step(step)) for r in ranks]
        assert one == two[0] + two[1]  # same packs, rank 0 takes the first micro_num of them
    assert single.state_dict() == ranks[0].state_dict() == ranks[1].state_dict()


def test_resume_with_another_dp_size_continues_the_global_sequence():
    single = make_loader(4)
    want = [ids(single.next_step(s)) for s in range(5)]
    ranks = [make_loader(2, r, 2) for r in range(2)]
    for s in range(2):
        assert [p for r in ranks for p in ids(r.next_step(s))] == want[s]
    resumed = make_loader(4)  # dp 2 -> dp 1 with the same global batch
    resumed.load_state_dict(ranks[1].state_dict())
    assert [ids(resumed.next_step(s)) for s in range(2, 5)] == want[2:]


def test_rampup_micro_num_start_incr_every():
    # InternEvo's rampup_batch_size="start incr every": micro_num = min(micro_num, start + incr * (step // every))
    assert [micro_num_at(s, 4, (1, 1, 2)) for s in range(10)] == [1, 1, 2, 2, 3, 3, 4, 4, 4, 4]
    assert [micro_num_at(s, 8, (2, 3, 3)) for s in range(8)] == [2, 2, 2, 5, 5, 5, 8, 8]
    assert [micro_num_at(s, 4, None) for s in range(3)] == [4, 4, 4]
    assert [position_at(s, 4, 2, (1, 1, 2)) for s in range(6)] == [0, 2, 4, 8, 12, 18, 24][:6]
    loader = make_loader(4, rampup="1 1 2")
    sizes = []
    for s in range(9):
        sizes.append(len(loader.next_step(s)))
        assert loader.state_dict()["position"] == position_at(s + 1, 4, 1, (1, 1, 2))
    assert sizes == [1, 1, 2, 2, 3, 3, 4, 4, 4]
    # resume in the middle of the ramp
    full = make_loader(4, rampup="1 1 2")
    want = [ids(full.next_step(s)) for s in range(7)]
    part = make_loader(4, rampup="1 1 2")
    [part.next_step(s) for s in range(3)]
    again = make_loader(4, rampup="1 1 2")
    again.load_state_dict(part.state_dict())
    assert [ids(again.next_step(s)) for s in range(3, 7)] == want[3:]


def test_prefetch_does_not_change_the_sequence():
    a = make_loader(2)
    b = TrainLoader(a.sources, a.data, prefetch=True)
    try:
        for s in range(5):
            assert ids(a.next_step(s)) == ids(b.next_step(s))
        # a state loaded while a prefetch is pending discards it
        b.load_state_dict({"position": 2})
        c = make_loader(2)
        c.load_state_dict({"position": 2})
        assert ids(b.next_step(1)) == ids(c.next_step(1))
    finally:
        b.close()
