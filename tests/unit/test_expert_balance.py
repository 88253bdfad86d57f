"""The MoE balance loss in a training step (spindle/train/expert_balance.py), against its definition computed by
hand: the step's gradient is that of mean cross-entropy + mean over micro-batches (and data-parallel ranks) of the
micro-batch's aux loss; two data-parallel ranks of one micro-batch each give what one process with both
micro-batches gives; the reported moe_loss is that mean; the bias moves by the step's summed load."""

import pytest
import torch

from spindle.config import ModelConfig
from spindle.model.llama import build_model
from spindle.parallel.executor import StepExecutor
from spindle.train.expert_balance import ExpertBalance, layer_label
from helpers import micro_batch

CPU = torch.device("cpu")


def tiny_moe(**keys):
    cfg = ModelConfig(hidden_size=32, num_attention_heads=4, num_layers=2, vocab_size=64, multiple_of=16,
                      max_position_embeddings=16, num_experts=4, top_k=2, moe_intermediate_size=16,
                      aux_loss_coeff=0.5, z_loss_coeff=0.01, **keys)
    return build_model(cfg.to_args(), "cpu", seed=3)


def executor(model):
    return StepExecutor(model, device=CPU, compute_dtype=torch.float32, label_smoothing=0.0, n_sources=1,
                        tensor_parallel=False, full_shard=False)


def two_micro_batches():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (4, 17), generator=g)
    labels = ids[:, 1:].clone()
    labels[0, :5] = -100  # not every token carries a loss: N counts the labelled ones
    return [micro_batch(ids[:2, :-1], labels[:2]), micro_batch(ids[2:, :-1], labels[2:])]


def gradients(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_two_ranks_match_one_process_and_the_definition_by_hand():
    model, batches = tiny_moe(), two_micro_batches()
    n = float(sum(b.num_labels() for b in batches))
    ex, balance = executor(model), ExpertBalance.of(model, CPU)

    # by hand: gradient of  sum(CE) / N  +  mean over the 2 micro-batches of their aux loss
    auxes = []
    for b in batches:
        out = model(b.input_ids, b.position_ids, labels=b.labels)
        auxes.append(model.moe_aux_loss.detach())
        (out.loss_sum / n + model.moe_aux_loss / 2).backward()
    by_hand = gradients(model)
    assert float(by_hand["layers.0.feed_forward.gate.weight"].abs().sum()) > 0

    # one process, both micro-batches in one step (loss scale 1 / N, as the trainer gives it with 1 rank)
    model.zero_grad(set_to_none=True)
    balance.start_step(1.0, 2)
    ex.forward_backward(batches, torch.tensor(1 / n), balance=balance)
    one_process, one_totals = gradients(model), balance.totals.clone()

    # two data-parallel ranks, one micro-batch each: scale G / N = 2 / N, gradients averaged over the ranks
    per_rank, totals = [], torch.zeros_like(one_totals)
    for b in batches:
        model.zero_grad(set_to_none=True)
        balance.start_step(1.0, 1)
        ex.forward_backward([b], torch.tensor(2 / n), balance=balance)
        per_rank.append(gradients(model))
        totals += balance.totals  # what layout.sum_over_data_ranks adds up
    averaged = {k: (per_rank[0][k] + per_rank[1][k]) / 2 for k in per_rank[0]}

    for name, grad in by_hand.items():
        torch.testing.assert_close(one_process[name], grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(averaged[name], grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(totals, one_totals)
    metrics = balance.metrics(totals.tolist())
    assert metrics["moe_loss"] == pytest.approx(float(sum(auxes)) / 2, rel=1e-6)


def test_the_loss_scale_multiplies_the_balance_term_too():
    model, batches = tiny_moe(), two_micro_batches()
    ex, balance = executor(model), ExpertBalance.of(model, CPU)
    balance.start_step(1.0, 2)
    ex.forward_backward(batches, torch.tensor(1.0), balance=balance)
    plain = gradients(model)
    model.zero_grad(set_to_none=True)
    balance.start_step(1024.0, 2)  # fp16's scale: the whole loss scaled, unscaled by the trainer after
    ex.forward_backward(batches, torch.tensor(1024.0), balance=balance)
    for name, grad in gradients(model).items():
        torch.testing.assert_close(grad / 1024, plain[name], rtol=1e-5, atol=1e-7)


def test_metrics_and_bias_follow_the_summed_load():
    model = tiny_moe(bias_update_rate=0.1, capacity_factor=1.0, min_capacity=1)
    balance = ExpertBalance.of(model, CPU)
    assert balance.labels == ["layer0", "layer1"] and balance.with_capacity
    e = 4
    # aux sum 3, 2 micro-batches; layer0: load (6, 2, 0, 0) with 2 dropped; layer1 balanced, none dropped
    values = [3.0, 2.0, 6.0, 2.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.0]
    balance.totals = torch.tensor(values, dtype=torch.float64)
    m = balance.metrics(values)
    assert m["moe_loss"] == 1.5 and m["moe_imbalance"] == pytest.approx(3.0) and m["moe_dropped"] == 0.25
    assert m["moe_imbalance/layer1"] == pytest.approx(1.0) and m["moe_dropped/layer1"] == 0.0
    assert m["moe_load/layer0"] == [6, 2, 0, 0]
    balance.update_bias()
    blocks = balance.blocks
    assert blocks[0].score_bias.tolist() == pytest.approx([-0.1, 0.0, 0.1, 0.1])  # against the overloaded one
    assert blocks[1].score_bias.tolist() == [0.0] * e  # balanced: sign(0) moves nothing


def test_without_balance_losses_there_is_no_moe_loss_and_no_term():
    model, batches = tiny_moe(), two_micro_batches()
    for block in ExpertBalance.of(model, CPU).blocks:
        block.aux_loss_coeff = block.z_loss_coeff = 0.0
    balance = ExpertBalance.of(model, CPU)
    balance.start_step(1.0, 1)
    model(batches[0].input_ids, batches[0].position_ids)
    assert balance.after_forward() is None
    assert "moe_loss" not in balance.metrics(balance.totals.tolist())
    assert ExpertBalance.of(build_model(ModelConfig(hidden_size=32, num_attention_heads=4, num_layers=1,
                                                    vocab_size=64).to_args()), CPU) is None


def test_layer_labels_skip_wrapper_segments():
    assert layer_label("layers.3.feed_forward") == "layer3"
    assert layer_label("layers.12._checkpoint_wrapped_module.feed_forward") == "layer12"


def test_the_moe_step_adds_no_host_sync(tmp_path, monkeypatch):
    """The balance term, the statistics, their reduction and the bias update stay on the device: the step keeps its
    one read (update or skip); the CPU's loop kernel reads its group sizes (CUDA's grouped GEMMs do not)."""
    from helpers import step_cfg
    from spindle.parallel.mesh import ParallelEnv
    from spindle.train.trainer import Trainer
    from unit.test_host_syncs import audited_step

    moe = {"num_experts": 4, "top_k": 2, "z_loss_coeff": 1e-3, "bias_update_rate": 0.01}
    trainer = Trainer(step_cfg(tmp_path, model=moe), ParallelEnv())
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    batches = [micro_batch(ids[:2], torch.roll(ids[:2], -1, 1)), micro_batch(ids[2:], torch.roll(ids[2:], -1, 1))]
    trainer.train_step(batches)  # warm
    bias = [b.score_bias.clone() for b in trainer.raw_model.moe_blocks()]
    hits = audited_step(trainer, batches, monkeypatch)
    assert dict(hits) == {"train_step": 1, "experts_loop": 2 * 2}  # 2 MoE layers x 2 micro-batches
    assert any(not torch.equal(a, b.score_bias) for a, b in zip(bias, trainer.raw_model.moe_blocks()))
