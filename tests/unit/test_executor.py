"""The step executor alone (no Trainer, no mesh): gradients of the token-weighted loss, statistics per source."""

import pytest
import torch
import torch.nn.functional as F

from spindle.config import ModelConfig
from spindle.data.batch import Batch
from spindle.model.llama import build_model
from spindle.parallel.executor import StepExecutor

VOCAB = 64


def model():
    cfg = ModelConfig(hidden_size=32, num_attention_heads=4, num_kv_attention_heads=2, num_layers=2,
                      vocab_size=VOCAB, multiple_of=16, max_position_embeddings=16)
    return build_model(cfg.to_args(), seed=3)


def executor(m, smoothing=0.0, sources=2):
    return StepExecutor(m, device=torch.device("cpu"), compute_dtype=torch.float32, label_smoothing=smoothing,
                        n_sources=sources, tensor_parallel=False, full_shard=False)


def batch(ids, labels, types=None):
    b, n = ids.shape
    types = torch.zeros(b, n, dtype=torch.long) if types is None else types
    return Batch(ids, labels, torch.arange(n).expand(b, n).contiguous(), types)


def grads(m):
    return [p.grad.clone() for p in m.parameters()]


@pytest.fixture
def rows():
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 16))
    labels = torch.roll(ids, -1, 1)
    labels[0, 3:] = -100  # row 0 has 3 labelled tokens, row 1 has 16: 19 in all
    return ids, labels


def test_gradients_are_those_of_the_mean_over_all_labelled_tokens(rows):
    ids, labels = rows
    ref_model = model()
    ref = F.cross_entropy(ref_model(ids).flatten(0, 1), labels.flatten(), ignore_index=-100)  # mean over 19
    ref.backward()
    want = grads(ref_model)

    whole, split = model(), model()
    stats = executor(whole).forward_backward([batch(ids, labels)], loss_scale=1 / 19)
    executor(split).forward_backward([batch(ids[:1], labels[:1]), batch(ids[1:], labels[1:])], loss_scale=1 / 19)
    for w, a, b in zip(want, grads(whole), grads(split)):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b, w, rtol=1e-5, atol=1e-7)
    assert stats[1, 0].item() == 19 and stats[0, 0].item() / 19 == pytest.approx(ref.item(), rel=1e-6)

    # what the weighting rules out: the mean of the two micro-batch means has another gradient
    means = model()
    for r in (slice(0, 1), slice(1, 2)):
        F.cross_entropy(means(ids[r]).flatten(0, 1), labels[r].flatten(), ignore_index=-100).div(2).backward()
    assert not torch.allclose(grads(means)[0], want[0], rtol=1e-3)


def test_statistics_per_source_and_hits(rows):
    ids, labels = rows
    types = torch.zeros_like(ids)
    types[1, 8:] = 1
    m = model()
    stats = executor(m).evaluate([batch(ids, labels, types)])
    with torch.no_grad():
        logits = m(ids)
    tok = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    hit = (logits.argmax(-1) == labels).flatten()
    t, valid = types.flatten(), labels.flatten() != -100
    for s in (0, 1):
        sel = (t == s) & valid
        assert stats[1, s].item() == sel.sum().item()
        assert stats[0, s].item() == pytest.approx(tok[sel].sum().item(), rel=1e-6)
        assert stats[2, s].item() == hit[sel].sum().item()
    assert stats[:, -1].abs().sum() == 0  # the total column is the trainer's


def test_label_smoothing_trains_but_is_not_reported(rows):
    ids, labels = rows
    plain, smooth = model(), model()
    a = executor(plain).forward_backward([batch(ids, labels)], 1.0)
    b = executor(smooth, smoothing=0.1).forward_backward([batch(ids, labels)], 1.0)
    assert torch.equal(a, b)  # the statistics are the plain cross-entropy either way
    assert not torch.allclose(grads(plain)[0], grads(smooth)[0])  # the gradient is the smoothed loss's
