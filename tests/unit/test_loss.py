"""The fused head + cross-entropy (spindle/model/loss.py) against the unfused PyTorch computation."""

import pytest
import torch
import torch.nn.functional as F

from spindle.model.loss import chunk_rows, linear_cross_entropy


def _inputs(n=70, d=16, vocab=50, seed=0, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, d, generator=g, dtype=torch.float64) * 0.3
    labels = torch.randint(0, vocab, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return h, w, labels


def _reference(h, w, labels, scale):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    logits = h @ w.t()
    token = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
    (token.sum() * scale).backward()
    correct = (logits.argmax(-1) == labels) & (labels != -100)
    return token.sum().detach(), token.detach(), correct, h.grad, w.grad


@pytest.mark.parametrize("rows", [7, 16, 64, 1000])  # chunks that do and do not divide n, and one chunk
def test_matches_unfused_cross_entropy(rows):
    h, w, labels = _inputs()
    ref_sum, ref_tok, ref_correct, ref_gh, ref_gw = _reference(h, w, labels, scale=0.37)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = linear_cross_entropy(hh, ww, labels, rows=rows)
    (out.loss_sum * 0.37).backward()
    torch.testing.assert_close(out.loss_sum.detach(), ref_sum.float(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out.token_loss, ref_tok.float(), rtol=1e-6, atol=1e-6)
    assert torch.equal(out.correct, ref_correct)
    assert out.token_loss[labels == -100].abs().max() == 0
    torch.testing.assert_close(hh.grad, ref_gh, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ww.grad, ref_gw, rtol=1e-6, atol=1e-6)


def test_3d_input_and_no_grad_path():
    h, w, labels = _inputs(n=24)
    with torch.no_grad():
        out = linear_cross_entropy(h.view(2, 12, -1), w, labels.view(2, 12), rows=5)
    ref = F.cross_entropy(h @ w.t(), labels, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(out.loss_sum, ref.float(), rtol=1e-6, atol=1e-5)
    assert not out.loss_sum.requires_grad


def test_all_labels_ignored_gives_zero_loss_and_gradient():
    h, w, _ = _inputs(n=10)
    labels = torch.full((10,), -100)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = linear_cross_entropy(hh, ww, labels)
    out.loss_sum.backward()
    assert out.loss_sum.item() == 0 and not out.correct.any()
    assert hh.grad.abs().max() == 0 and ww.grad.abs().max() == 0


def test_tied_weight_gradients_add_up():
    """The head weight doubling as the embedding gets both gradients (autograd accumulates)."""
    h, w, labels = _inputs(n=12, vocab=20, ignore_every=0)
    ids = torch.randint(0, 20, (12,), generator=torch.Generator().manual_seed(3))
    w1 = w.clone().requires_grad_()
    (F.embedding(ids, w1).sum() + linear_cross_entropy(h + 0, w1, labels, rows=5).loss_sum).backward()
    w2 = w.clone().requires_grad_()
    (F.embedding(ids, w2).sum() + F.cross_entropy(h @ w2.t(), labels, reduction="sum")).backward()
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-6, atol=1e-6)


def test_bf16_autocast_close_to_fp32():
    h, w, labels = (t.float() if t.is_floating_point() else t for t in _inputs(n=32, d=32, vocab=64))
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(hh, ww, labels, rows=8)
    out.loss_sum.backward()
    ref_sum, _, _, ref_gh, ref_gw = _reference(h.double(), w.double(), labels, scale=1.0)
    assert out.loss_sum.dtype == torch.float32 and ww.grad.dtype == torch.float32
    assert abs(out.loss_sum.item() - ref_sum.item()) / ref_sum.item() < 2e-2
    assert (ww.grad.double() - ref_gw).abs().max() < 0.05 * ref_gw.abs().max()
    assert (hh.grad.double() - ref_gh).abs().max() < 0.05 * ref_gh.abs().max()


def test_chunk_rows_sizes_logits_for_the_cache():
    assert chunk_rows(8192, "cpu") == 256  # 2 Mi fp32 logits = 8 MiB per chunk
    assert chunk_rows(256_000, "cpu") == 64  # never fewer rows than a useful GEMM
    assert chunk_rows(128_256, "cuda") >= 2048


@pytest.mark.parametrize("rows", [16, 1000])
def test_label_smoothing_matches_pytorch(rows):
    """The summed loss and the gradients follow F.cross_entropy(label_smoothing=ε); token_loss stays plain."""
    h, w, labels = _inputs(vocab=40)
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    logits = hr @ wr.t()
    smooth = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum", label_smoothing=0.2)
    (smooth * 0.5).backward()
    plain = F.cross_entropy(logits.detach(), labels, ignore_index=-100, reduction="none")
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = linear_cross_entropy(hh, ww, labels, rows=rows, label_smoothing=0.2)
    (out.loss_sum * 0.5).backward()
    torch.testing.assert_close(out.loss_sum.detach().double(), smooth.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out.token_loss, plain.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hh.grad, hr.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ww.grad, wr.grad, rtol=1e-6, atol=1e-6)
    assert (smooth - plain.sum()).abs() > 1.0  # smoothing visibly changes the loss here
