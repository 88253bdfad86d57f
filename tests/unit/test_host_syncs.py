"""The training step's host syncs, counted between the first forward and optimizer.step().

On a GPU every read of a device value by the host (`.item()`, `bool(t)`, `torch.equal`, `.tolist()`,
a `nonzero` whose size the host needs) stalls the stream until the queued kernels ran. The audit counts
the ATen ops that need one (a TorchDispatchMode sees them on CPU tensors too, where they cost nothing)
plus the Tensor methods that read values without an ATen op on CPU, and attributes each to the
innermost spindle/ function. Only the whitelist may appear:
"""

import collections
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from spindle.parallel.mesh import ParallelEnv
from spindle.train.trainer import Trainer
from helpers import micro_batch
from helpers import step_cfg as tiny_cfg

# function -> syncs per step, and why it must read the device
WHITELIST = {
    # the documents' starts and the largest position of a (B, L) batch, one read per micro-batch forward:
    # varlen attention takes its boundaries on the host, and RoPE scaling / the window check use the span
    "document_layout": "per micro-batch",
    # update or skip: a non-finite loss or gradient norm skips optimizer.step(), which the host must know
    "train_step": 1,
}
SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default,
            torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default, torch.ops.aten.nonzero.default,
            torch.ops.aten.masked_select.default, torch.ops.aten.unique_consecutive.default}
READS = ("tolist", "cpu", "__bool__", "__int__", "__float__")  # (.numpy() refuses CUDA tensors)


def where() -> str:
    frames = [f for f in traceback.extract_stack() if "/spindle/" in f.filename and "/tests/" not in f.filename]
    return frames[-1].name if frames else "<outside spindle>"


class SyncAudit(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.active, self.inside, self.hits = False, False, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active and not self.inside and func in SYNC_OPS:
            self.hits[where()] += 1
        return func(*args, **(kwargs or {}))


def audited_step(trainer, micro_batches, monkeypatch) -> collections.Counter:
    audit = SyncAudit()
    trainer.model.register_forward_pre_hook(lambda *_: setattr(audit, "active", True))
    trainer.optimizer.register_step_pre_hook(lambda *_: setattr(audit, "active", False))
    for name in READS:  # reads that take no ATen op on CPU tensors (on CUDA: a copy to the host)
        original = getattr(torch.Tensor, name)

        def read(self, *a, _original=original, **k):
            if audit.active and not audit.inside:  # one read, whatever ATen ops it takes
                audit.hits[where()] += 1
            inside, audit.inside = audit.inside, True
            try:
                return _original(self, *a, **k)
            finally:
                audit.inside = inside

        monkeypatch.setattr(torch.Tensor, name, read)
    with audit:
        trainer.train_step(micro_batches)
    monkeypatch.undo()
    return audit.hits


def expected(micro_num: int) -> dict:
    return {k: micro_num if v == "per micro-batch" else v for k, v in WHITELIST.items()}


@pytest.mark.parametrize("over", [
    {},  # dense rows, gradient clipping on
    {"model": {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "sliding_window": 16}},
    {"loss": {"label_smoothing": 0.1}, "model": {"dtype": "torch.float16"}},  # smoothing, fp16 loss scaling
], ids=["dense", "dynamic-rope-window", "smoothing-fp16"])
def test_step_has_only_the_whitelisted_host_syncs(tmp_path, monkeypatch, over):
    tr = Trainer(tiny_cfg(tmp_path, **over), ParallelEnv(), log=lambda *_: None)
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 16))
    labels = torch.roll(ids, -1, 1)
    labels[0, 5:] = -100  # some tokens without a label
    packed = micro_batch(ids, labels)
    packed.position_ids[1, 9:] = torch.arange(7)  # a second document in row 1
    out_before = tr.train_step([micro_batch(ids, labels)])  # warm (lazy state, first-step allocations)
    hits = audited_step(tr, [micro_batch(ids, labels), packed], monkeypatch)
    assert dict(hits) == expected(2), f"host syncs in the step beyond the whitelist: {dict(hits)}"
    assert out_before["finite"] and tr.state.updates == 2  # the audited step did update


def test_the_audit_sees_a_sync(tmp_path, monkeypatch):
    """Not vacuous: an `.item()` and a `.tolist()` in the step are counted where they happen."""
    from spindle.train import optim

    tr = Trainer(tiny_cfg(tmp_path), ParallelEnv(), log=lambda *_: None)
    ids = torch.randint(0, 64, (2, 16))
    clip = optim.clip_gradients

    def syncing_clip(*a, **k):
        norm = clip(*a, **k)
        norm.item(), norm.reshape(1).tolist()
        return norm

    monkeypatch.setattr("spindle.train.trainer.clip_gradients", syncing_clip)
    hits = audited_step(tr, [micro_batch(ids, torch.roll(ids, -1, 1))], monkeypatch)
    assert hits["syncing_clip"] == 0  # defined in tests/: attributed to its spindle caller
    assert hits["train_step"] == 1 + 2
