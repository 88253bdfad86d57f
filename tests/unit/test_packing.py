"""Packing rules: document segments (where positions restart), position ids, labels, long documents, concat
windows, min_length, seeds."""

import numpy as np
import pytest

from spindle.data.batch import Batch
from spindle.data.packing import PackedDocuments, collate


class ListDocs:
    """Documents from Python lists, optionally with a loss mask per document."""

    def __init__(self, docs, masks=None):
        self.docs = [np.asarray(d, dtype=np.int64) for d in docs]
        self.masks = masks
        self.lengths = np.array([len(d) for d in self.docs], dtype=np.int64)

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, i):
        return self.docs[i], (None if self.masks is None else np.asarray(self.masks[i], dtype=bool))


A, B, C = [1, 2, 3], [4, 5, 6, 7, 8], [9, 10]



def bounds(pack) -> list[int]:
    """Where the pack's segments start in its flattened tokens (positions restart at 0), and its end."""
    flat = np.asarray(pack.position_ids).reshape(-1)
    return [int(i) for i in np.nonzero(flat == 0)[0]] + [flat.size]

def test_cut_mode_hand_example():
    # stream 1 2 3 | 4 5 6 7 8 | 9 10, packs of micro_bsz * seq_len = 2 * 4 = 8 tokens
    packed = PackedDocuments(ListDocs([A, B, C]), seq_len=4, micro_bsz=2, type_id=3, shuffle=False)
    assert len(packed) == 1  # 10 tokens // 8; the 2-token tail is dropped
    p = packed[0]
    assert p.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    # segments: A (3 tokens), the head of B (1 token, cut at the row edge), the rest of B (4 tokens)
    assert bounds(p) == [0, 3, 4, 8]
    assert p.position_ids.tolist() == [[0, 1, 2, 0], [0, 1, 2, 3]]
    # next token of the same document; -100 at a document's end; a row edge inside B keeps B's next token
    assert p.labels.tolist() == [[2, 3, -100, 5], [6, 7, 8, -100]]
    assert p.type_ids.tolist() == [[3] * 4] * 2
    with pytest.raises(IndexError):
        packed[1]


def test_document_longer_than_seq_len_is_split_into_seq_len_pieces():
    d, e = list(range(1, 11)), [11, 12]
    p = PackedDocuments(ListDocs([d, e]), seq_len=4, micro_bsz=3, shuffle=False)[0]
    assert p.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    assert bounds(p) == [0, 4, 8, 10, 12]
    assert p.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 0, 1]]
    assert p.labels.tolist() == [[2, 3, 4, 5], [6, 7, 8, 9], [10, -100, 12, -100]]
    assert max(np.diff(bounds(p))) <= 4


def test_document_continues_into_the_next_pack_with_positions_restarting():
    packed = PackedDocuments(ListDocs([[1, 2, 3, 4, 5, 6], [7, 8]]), seq_len=2, micro_bsz=2, shuffle=False)
    assert len(packed) == 2
    p0, p1 = packed[0], packed[1]
    assert p0.input_ids.tolist() == [[1, 2], [3, 4]] and p0.labels.tolist() == [[2, 3], [4, 5]]
    assert p1.input_ids.tolist() == [[5, 6], [7, 8]] and p1.labels.tolist() == [[6, -100], [8, -100]]
    assert p1.position_ids.tolist() == [[0, 1], [0, 1]] and bounds(p1) == [0, 2, 4]


def test_concat_mode_fixed_windows_and_labels():
    p = PackedDocuments(ListDocs([A, B, C]), seq_len=4, micro_bsz=2, shuffle=False, pack_into_one=True)[0]
    assert p.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert bounds(p) == [0, 4, 8]  # attention crosses documents inside a window
    assert p.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert p.labels.tolist() == [[2, 3, -100, 5], [6, 7, 8, -100]]  # still -100 at document ends


def test_loss_mask_sets_labels_to_minus_100_where_the_target_is_masked():
    # B: prompt 4 5, response 6 7 8 (mask[j] True when token j is a target)
    docs = ListDocs([B, [9, 10, 11]], masks=[[False, False, True, True, True], [True, True, True]])
    p = PackedDocuments(docs, seq_len=8, micro_bsz=1, shuffle=False)[0]
    assert p.input_ids.tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert p.labels.tolist() == [[-100, 6, 7, 8, -100, 10, 11, -100]]


def test_min_length_filter():
    docs = ListDocs([A, B, C])
    assert PackedDocuments(docs, 4, 2, shuffle=False, min_length=3).order.tolist() == [0, 1]
    packed = PackedDocuments(docs, 4, 2, shuffle=False, min_length=3)
    assert packed.total_tokens == 8 and packed[0].input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    only_b = PackedDocuments(docs, 4, 2, shuffle=False, min_length=4)
    assert only_b.order.tolist() == [1] and len(only_b) == 0  # 5 tokens < one pack of 8


def test_shuffle_same_seed_same_order_different_seed_different_order():
    rng = np.random.default_rng(0)
    docs = ListDocs([rng.integers(0, 100, size=int(n)) for n in rng.integers(3, 30, size=60)])
    a = PackedDocuments(docs, 16, 2, seed=5)
    b = PackedDocuments(docs, 16, 2, seed=5)
    c = PackedDocuments(docs, 16, 2, seed=6)
    assert a.order.tolist() == b.order.tolist() and sorted(a.order.tolist()) == list(range(60))
    assert a.order.tolist() != c.order.tolist()
    assert all(np.array_equal(a[i].input_ids, b[i].input_ids) for i in range(len(a)))
    assert any(not np.array_equal(a[i].input_ids, c[i].input_ids) for i in range(len(a)))
    # the packs are the shuffled stream cut every 32 tokens
    stream = np.concatenate([docs.docs[k] for k in a.order])
    assert np.array_equal(np.concatenate([a[i].input_ids.ravel() for i in range(len(a))]),
                          stream[: len(a) * 32])


def test_collate_gives_the_batch_contract():
    import torch

    packed = PackedDocuments(ListDocs([A, B, C]), seq_len=4, micro_bsz=2, shuffle=False)
    (mb,) = collate([packed[0]])
    assert isinstance(mb, Batch)
    assert mb.input_ids.dtype == torch.int64 and mb.input_ids.shape == (2, 4)
    assert mb.position_ids.dtype == torch.int64 and mb.labels.dtype == torch.int64
