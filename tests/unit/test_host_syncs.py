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

# function -> syncs per step, and why it must read the device. (The documents' starts and the largest
# position of a batch, which varlen attention, RoPE scaling and the window check need on the host, are
# read by the loader from the host copy of the positions: spindle.model.attention.HostLayout.)
WHITELIST = {
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
    tr = Trainer(tiny_cfg(tmp_path, **over), ParallelEnv())
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

    tr = Trainer(tiny_cfg(tmp_path), ParallelEnv())
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


def test_the_audit_sees_the_layout_read_back_from_the_device(tmp_path, monkeypatch):
    """Not vacuous for the documents either: a batch without its host layout (as every batch was before the
    loader read it) makes each forward read the positions back, and the audit counts those reads."""
    from spindle.data.batch import Batch

    tr = Trainer(tiny_cfg(tmp_path), ParallelEnv())
    ids = torch.randint(0, 64, (2, 16))
    to = Batch.to

    def to_without_documents(self, *a, **k):
        moved = to(self, *a, **k)
        moved.documents = None
        return moved

    monkeypatch.setattr(Batch, "to", to_without_documents)
    batches = [micro_batch(ids, torch.roll(ids, -1, 1)) for _ in range(2)]
    hits = audited_step(tr, batches, monkeypatch)
    assert hits["document_layout"] == 2 and dict(hits) != expected(2)


def tiny_model_args(**kw):
    from spindle.config import ModelConfig

    return ModelConfig(**{**dict(hidden_size=64, num_attention_heads=4, num_kv_attention_heads=2, num_layers=2,
                                 vocab_size=97, multiple_of=16, max_position_embeddings=64), **kw}).to_args()


def packed_batch(rows: int = 2, length: int = 16):
    """A batch as the loader makes it (on the host, its documents read there): documents of 5, 7 and the rest in
    row 0, of 11 and the rest in row 1."""
    from spindle.data.packing import Pack, collate

    pos = torch.arange(length).repeat(rows, 1)
    for row, start in ((0, 5), (0, 12), (1, 11)):
        pos[row, start:] = torch.arange(length - start)
    ids = torch.randint(0, 97, (rows, length), generator=torch.Generator().manual_seed(0))
    (batch,) = collate([Pack(ids.numpy(), ids.roll(-1, 1).numpy(), pos.numpy(), torch.zeros_like(ids).numpy())])
    return batch


@pytest.mark.parametrize("kernel", ["segments", "varlen"])
def test_a_packed_forward_reads_nothing_from_the_device(monkeypatch, kernel):
    """On the meta device any read of a value (`.item()`, `.tolist()`, `.cpu()`, `bool()`) raises: the packed
    forward and backward, with the span-dependent RoPE scaling and window check, run on what the loader read
    on the host. (varlen_attn is CUDA-only: here a stand-in on its contract checks what it is handed.)"""
    from spindle.model import attention
    from spindle.model.llama import Transformer

    handed = []
    if kernel == "varlen":
        import torch.nn.attention.varlen as varlen

        def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
            handed.append((cu_q.device.type, cu_q.dtype, max_q, max_k))
            return q * 1.0

        monkeypatch.setattr(varlen, "varlen_attn", fake_varlen)
        monkeypatch.setattr(attention, "choose_kernel", lambda *a, **k: attention.Kernel("varlen", True))
    args = tiny_model_args(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, sliding_window=16)
    with torch.device("meta"):
        model = Transformer(args)
    batch = packed_batch().to("meta")
    assert batch.input_ids.is_meta and batch.documents.starts == (0, 5, 12, 16, 27) and batch.documents.span == 11
    logits = model(batch.input_ids, batch.position_ids, documents=batch.documents)
    logits.float().sum().backward()
    assert logits.is_meta and logits.shape == (2, 16, 97)
    if kernel == "varlen":  # the boundaries summed on the host, handed over on the device, per layer
        assert handed == [("meta", torch.int32, 11, 11)] * args.num_layers
    with pytest.raises(NotImplementedError):  # the layout read from the device positions needs a host copy
        model(batch.input_ids, batch.position_ids)


def test_context_parallel_and_pipeline_stages_take_the_host_layout(tmp_path, monkeypatch):
    """A context-parallel rank (one-rank gloo group) and a pipeline stage find the documents in the host layout
    they are handed, with no read of the device, and compute what they computed from the positions."""
    import torch.distributed as dist

    from spindle.model import llama
    from spindle.parallel.context import ContextParallel
    from spindle.parallel.pipeline import PipelineStageModel

    batch = packed_batch(length=32)
    ids, pos, labels = batch.input_ids, batch.position_ids, batch.labels
    host_positions = torch.from_numpy(batch.documents.positions)
    stage = PipelineStageModel(llama.build_model(tiny_model_args(), seed=1))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cp = ContextParallel(llama.build_model(tiny_model_args(), seed=1), dist.group.WORLD)
        with torch.no_grad():
            ref_cp, ref_starts, ref_stage = cp(ids, pos, labels=labels), cp.slices.info.starts, stage(ids, pos, labels)
            monkeypatch.setattr(llama, "document_layout", lambda *_: pytest.fail("the layout read from the device"))
            audit = SyncAudit()
            audit.active = True
            with audit:
                out_cp = cp(ids, pos, labels=labels, documents=batch.documents)
            out_stage = stage(ids, pos, labels, host_positions=host_positions)
    finally:
        dist.destroy_process_group()
    assert cp.slices.info.starts == ref_starts == [[0, 5, 12], [0, 11]] and not audit.hits
    assert torch.equal(out_cp.token_loss, ref_cp.token_loss)
    assert all(torch.equal(a, b) for a, b in zip(out_stage, ref_stage))


def test_a_pipeline_schedule_hands_every_micro_batch_its_own_host_positions(tmp_path, monkeypatch):
    """What the pipeline executor relies on: `schedule.step(..., host_positions=)` splits the CPU tensor by rows
    as it splits the arguments, so each stage forward (shape inference included) gets its micro-batch's rows."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    from spindle.data.batch import Batch
    from spindle.model import llama
    from spindle.parallel.pipeline import PipelineStageModel

    first = packed_batch()
    whole_rows = Batch(first.input_ids, first.labels, torch.arange(16).repeat(2, 1), first.type_ids)
    batch = Batch.stack([first, whole_rows])
    seen = []
    forward = PipelineStageModel.forward

    def recording(self, x, position_ids, labels, host_positions=None):
        seen.append(host_positions is not None and torch.equal(host_positions, position_ids))
        return forward(self, x, position_ids, labels, host_positions)

    monkeypatch.setattr(PipelineStageModel, "forward", recording)
    monkeypatch.setattr(llama, "document_layout", lambda *_: pytest.fail("the layout read from the device"))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        stage = PipelineStage(PipelineStageModel(llama.build_model(tiny_model_args(), seed=1)), 0, 1,
                              torch.device("cpu"), group=dist.group.WORLD)
        schedule = ScheduleGPipe(stage, 2, loss_fn=lambda out, target: out[0].sum(), scale_grads=False)
        schedule.step(batch.input_ids, batch.position_ids, batch.labels, target=batch.labels,
                      host_positions=torch.from_numpy(batch.documents.positions))
    finally:
        dist.destroy_process_group()
    assert len(seen) >= 2 and all(seen)
