"""The mixture-of-experts block (spindle/model/moe.py, moe_balance.py): routing and balance against closed forms
on tiny tensors, the experts against a token-by-token reference, the grouped-GEMM path's plumbing on CPU, the
block against transformers' own Mixtral / Qwen2-MoE / Qwen3-MoE blocks, the config keys and the layer pattern."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from spindle.config import validate_config
from spindle.config.model_args import ModelArgs
from spindle.errors import SpindleError
from spindle.model import moe as M
from spindle.model.llama import Transformer, build_model, count_parameters, weight_bytes
from spindle.model.moe_balance import RoutingStats, balance_bias_step, load_balancing_loss, router_z_loss

H, I, E = 16, 8, 4


def moe_args(**kw) -> ModelArgs:
    base = dict(vocab_size=32, hidden_size=H, num_layers=1, num_attention_heads=2, num_kv_heads=2, head_dim=8,
                ffn_hidden_size=24, num_experts=E, top_k=2, moe_intermediate_size=I)
    return ModelArgs(**{**base, **kw})


def random_block(seed=0, **kw) -> M.MoEFeedForward:
    torch.manual_seed(seed)
    block = M.MoEFeedForward(moe_args(**kw))
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    return block


# --------------------------------------------------------------------------- routing, closed forms


def test_route_softmax_topk_with_and_without_renormalisation():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()  # softmax = (0.5, 0.3, 0.2)
    r = M.route(logits, 2, "softmax", norm_topk_prob=True)
    assert r.experts.tolist() == [[0, 1]]
    torch.testing.assert_close(r.weights, torch.tensor([[0.625, 0.375]]))
    r = M.route(logits, 2, "softmax", norm_topk_prob=False)  # Qwen2-MoE's default
    torch.testing.assert_close(r.weights, torch.tensor([[0.5, 0.3]]))


def test_route_sigmoid_scores():
    logits = torch.tensor([[0.0, math.log(3), -math.log(3)]])  # sigmoid = (0.5, 0.75, 0.25)
    r = M.route(logits, 2, "sigmoid", norm_topk_prob=False)
    assert r.experts.tolist() == [[1, 0]]
    torch.testing.assert_close(r.weights, torch.tensor([[0.75, 0.5]]))
    torch.testing.assert_close(M.route(logits, 2, "sigmoid", True).weights, torch.tensor([[0.6, 0.4]]))


def test_balancing_bias_chooses_but_never_weighs():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    r = M.route(logits, 2, "softmax", norm_topk_prob=True, bias=torch.tensor([0.0, 0.0, 0.5]))
    assert r.experts.tolist() == [[2, 0]]  # 0.2 + 0.5 beats 0.5 beats 0.3
    torch.testing.assert_close(r.weights, torch.tensor([[0.2 / 0.7, 0.5 / 0.7]]))  # unbiased scores


def test_capacity_and_drops_against_a_hand_count():
    assert M.expert_capacity(10, 2, 4, 1.0, 4) == 5  # ceil(1.0 * 10 * 2 / 4)
    assert M.expert_capacity(10, 2, 4, 1.25, 0) == 7  # ceil(6.25)
    assert M.expert_capacity(2, 1, 4, 1.0, 4) == 4  # min_capacity
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    # first choices first: e0 takes tokens 0, 1 (token 2's is the third: dropped); e1 takes token 3 first,
    # then token 0's second choice; token 2's second (e1, third) and token 3's second (e0, third) drop
    keep = M.within_capacity(experts, 3, capacity=2)
    assert keep.tolist() == [[True, True], [True, True], [False, False], [True, False]]


# --------------------------------------------------------------------------- balance, closed forms


def test_load_balancing_loss_closed_form_and_sequence_wise():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    experts = torch.tensor([[0], [1]])
    # f = (1/2, 1/2, 0), P = (0.3, 0.45, 0.25): 3 * (0.15 + 0.225)
    torch.testing.assert_close(load_balancing_loss(probs, experts), torch.tensor(1.125))
    # per sequence of one token: 3 * 0.5 and 3 * 0.6, averaged
    torch.testing.assert_close(load_balancing_loss(probs, experts, sequences=2), torch.tensor(1.65))
    uniform = torch.full((4, 4), 0.25)
    assert load_balancing_loss(uniform, torch.tensor([[0], [1], [2], [3]])).item() == pytest.approx(1.0)


def test_load_balancing_loss_is_transformers_over_top_k():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    logits = torch.randn(20, 5)
    r = M.route(logits, 2)
    ours = load_balancing_loss(r.scores, r.experts)
    torch.testing.assert_close(2 * ours, load_balancing_loss_func((logits,), 5, 2))


def test_router_z_loss_closed_form():
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])  # logsumexp: log 2, log 4 = 2 log 2
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(2.5 * math.log(2) ** 2))


def test_bias_step_moves_against_the_load():
    bias = torch.zeros(3)
    balance_bias_step(bias, torch.tensor([4.0, 1.0, 1.0]), 0.1)  # mean 2
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.1, 0.1]))
    balance_bias_step(bias, torch.tensor([2.0, 2.0, 2.0]), 0.1)  # balanced: unchanged
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.1, 0.1]))


def test_block_keeps_stats_losses_and_updates_its_bias():
    block = random_block(bias_update_rate=0.05, aux_loss_coeff=0.1, z_loss_coeff=0.01, aux_loss_per_sequence=True)
    block.reset_buffers()
    x = torch.randn(2, 5, H)
    block(x)
    r = M.route(block.gate(x.reshape(-1, H)), 2)
    load = torch.bincount(r.experts.flatten(), minlength=E).float()
    torch.testing.assert_close(block.stats.load, load)
    torch.testing.assert_close(block.stats.imbalance, load.max() / load.mean())
    assert block.stats.dropped.item() == 0.0  # dropless
    expected = 0.1 * load_balancing_loss(r.scores, r.experts, 2) + 0.01 * router_z_loss(r.logits)
    torch.testing.assert_close(block.aux_loss, expected)
    block.update_bias()
    torch.testing.assert_close(block.score_bias, 0.05 * torch.sign(load.mean() - load))
    assert isinstance(block.stats, RoutingStats) and "score_bias" in block.state_dict()


# --------------------------------------------------------------------------- the experts


def token_by_token(block: M.MoEFeedForward, x: torch.Tensor, keep=None) -> torch.Tensor:
    """The block's output computed one token and one slot at a time, from its routing."""
    flat = x.reshape(-1, H)
    r = M.route(block.gate(flat), block.top_k, block.score, block.norm_topk_prob, block.score_bias)
    e = block.experts
    out = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        for j in range(block.top_k):
            if keep is None or keep[n, j]:
                k = r.experts[n, j]
                out[n] += r.weights[n, j] * M.swiglu(flat[n], e.w1.weight[k], e.w3.weight[k], e.w2.weight[k])
        if block.shared_experts is not None:
            s = block.shared_experts(flat[n])
            out[n] += torch.sigmoid(block.shared_expert_gate(flat[n])) * s if block.shared_expert_gate else s
    return out.view(x.shape)


@pytest.mark.parametrize("kw", [{}, {"router_score": "sigmoid"}, {"norm_topk_prob": False, "top_k": 3},
                                {"num_shared_experts": 2, "shared_expert_intermediate_size": 8,
                                 "shared_expert_gate": True}], ids=["softmax", "sigmoid", "top3", "shared"])
def test_expert_loop_matches_token_by_token(kw):
    block = random_block(**kw)
    x = torch.randn(3, 7, H)
    torch.testing.assert_close(block(x), token_by_token(block, x), rtol=1e-5, atol=1e-5)


def test_capacity_drops_in_the_block_against_a_hand_count():
    block = random_block(capacity_factor=0.5, min_capacity=0)
    with torch.no_grad():
        block.gate.weight.zero_()
        block.gate.weight[0, 0], block.gate.weight[1, 0] = 2.0, 1.0  # x[:, 0] > 0: every token picks 0 then 1
    x = torch.randn(1, 8, H)
    x[..., 0] = x[..., 0].abs() + 0.1
    out = block(x)
    # capacity ceil(0.5 * 8 * 2 / 4) = 2: experts 0 and 1 take tokens 0 and 1 only; 12 of 16 assignments drop
    assert block.stats.dropped.item() == pytest.approx(12 / 16)
    assert block.stats.load.tolist() == [8.0, 8.0, 0.0, 0.0]  # what was asked for, before the drop
    keep = torch.zeros(8, 2, dtype=torch.bool)
    keep[:2] = True
    torch.testing.assert_close(out, token_by_token(block, x, keep), rtol=1e-5, atol=1e-5)
    assert torch.all(out[0, 2:] == 0)  # dropped tokens: no expert output (the residual carries them)


def test_choose_expert_kernel_for_every_device_and_dtype():
    assert M.choose_expert_kernel("cuda", torch.bfloat16) == "grouped_mm"
    for device, dtype in [("cuda", torch.float32), ("cuda", torch.float16), ("cpu", torch.bfloat16),
                          ("cpu", torch.float32)]:
        assert M.choose_expert_kernel(device, dtype) == "loop"


def fake_grouped_mm(calls):
    """grouped_mm's documented contract (2D x 3D, offs = int32 ends of the groups), computed per group on
    CPU; rows past the last group are NaN, as unwritten memory may be."""
    def mm(a, b, *, offs=None, bias=None, out_dtype=None):
        assert offs.dtype == torch.int32 and b.shape[0] == offs.numel() and int(offs[-1]) <= a.shape[0]
        calls.append(offs.clone())
        out = torch.full((a.shape[0], b.shape[2]), float("nan"), dtype=a.dtype)
        start = 0
        for g, end in enumerate(offs.tolist()):
            out[start:end] = a[start:end] @ b[g]
            start = end
        return out
    return mm


@pytest.mark.parametrize("kw", [{}, {"capacity_factor": 0.5, "min_capacity": 1}], ids=["dropless", "dropping"])
def test_grouped_path_plumbing_on_cpu(monkeypatch, kw):
    calls = []
    monkeypatch.setattr(M, "grouped_mm_op", lambda: fake_grouped_mm(calls))
    block = random_block(**kw)
    x = torch.randn(2, 9, H, requires_grad=True)
    loop_out = block(x)
    loop_grads = torch.autograd.grad(loop_out.square().sum(), [x, block.experts.w2.weight])
    monkeypatch.setattr(M, "choose_expert_kernel", lambda device, dtype: "grouped_mm")  # as on CUDA in bf16
    grouped_out = block(x)
    grouped_grads = torch.autograd.grad(grouped_out.square().sum(), [x, block.experts.w2.weight])
    assert len(calls) == 3  # w1, w3, w2
    offs = calls[0]
    sizes = torch.diff(offs, prepend=offs.new_zeros(1))
    counts = torch.bincount(M.route(block.gate(x.reshape(-1, H)), 2).experts.flatten(), minlength=E)
    assert torch.all(sizes % M.GROUP_ALIGN == 0) and torch.all(sizes >= counts.clamp_max(sizes.max()))
    torch.testing.assert_close(grouped_out, loop_out, rtol=1e-5, atol=1e-5)
    for g, ref in zip(grouped_grads, loop_grads):
        torch.testing.assert_close(g, ref, rtol=0, atol=1e-5)


def test_padded_groups_place_every_assignment_in_its_expert_rows():
    experts = torch.tensor([[2, 0], [2, 1], [2, 0]])
    keep = torch.tensor([[True, True], [True, True], [False, True]])
    plan = M.plan_by_expert(experts, torch.ones(3, 2), keep, 3)
    offs, rows = M.padded_groups(plan, align=4)
    assert offs.tolist() == [4, 8, 12]  # counts 2, 1, 2 each padded to 4
    assert plan.experts.tolist() == [0, 0, 1, 2, 2, 3]  # the dropped one last, as expert E
    assert rows.tolist() == [0, 1, 4, 8, 9, 6 + 3 * 3]  # the dropped one past every group


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="no public grouped_mm in this torch")
def test_grouped_path_with_the_real_kernel_in_bf16_on_cpu():
    block = random_block().to(torch.bfloat16)
    x = torch.randn(2, 9, H, dtype=torch.bfloat16)
    plan = M.plan_by_expert(*M.route(block.gate(x.reshape(-1, H)), 2)[2:], None, E)
    w = block.experts
    loop = M.experts_loop(x.reshape(-1, H).float(), plan, w.w1.weight.float(), w.w3.weight.float(), w.w2.weight.float())
    try:
        grouped = M.experts_grouped(x.reshape(-1, H), plan, w.w1.weight, w.w3.weight, w.w2.weight)
    except RuntimeError as e:  # CPU support of the kernel is not promised
        pytest.skip(f"grouped_mm does not run on this CPU: {e}")
    torch.testing.assert_close(grouped.float(), loop, rtol=0.05, atol=0.05)


# --------------------------------------------------------------------------- against transformers


def hf_block(family):
    if family == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=2,
                            experts_implementation="eager")
        return MixtralSparseMoeBlock(cfg), {}
    if family == "qwen2_moe":
        from transformers import Qwen2MoeConfig
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

        cfg = Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=I, shared_expert_intermediate_size=20,
                             num_experts=E, num_experts_per_tok=2, experts_implementation="eager")
        assert cfg.norm_topk_prob is False
        return Qwen2MoeSparseMoeBlock(cfg), dict(norm_topk_prob=False, num_shared_experts=1,
                                                 shared_expert_intermediate_size=20, shared_expert_gate=True)
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=2,
                         norm_topk_prob=True, experts_implementation="eager")
    return Qwen3MoeSparseMoeBlock(cfg), {}


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_block_matches_transformers(family):
    torch.manual_seed(1)
    theirs, kw = hf_block(family)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.5)
    ours = M.MoEFeedForward(moe_args(**kw))
    with torch.no_grad():
        ours.gate.weight.copy_(theirs.gate.weight)
        ours.experts.w1.weight.copy_(theirs.experts.gate_up_proj[:, :I])
        ours.experts.w3.weight.copy_(theirs.experts.gate_up_proj[:, I:])
        ours.experts.w2.weight.copy_(theirs.experts.down_proj)
        if ours.shared_experts is not None:
            ours.shared_experts.w1.weight.copy_(theirs.shared_expert.gate_proj.weight)
            ours.shared_experts.w3.weight.copy_(theirs.shared_expert.up_proj.weight)
            ours.shared_experts.w2.weight.copy_(theirs.shared_expert.down_proj.weight)
            ours.shared_expert_gate.weight.copy_(theirs.shared_expert_gate.weight)
    x = torch.randn(2, 6, H)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- config and model


def test_config_keys_resolve_and_dense_stays_dense():
    dense = validate_config({}).model.to_args()
    assert dense.num_experts == 0 and not any(dense.is_moe_layer(i) for i in range(dense.num_layers))
    cfg = validate_config({"model": dict(hidden_size=64, num_attention_heads=4, num_layers=4, num_experts=8,
                                         first_k_dense=1, moe_every=2, num_shared_experts=1)}).model
    args = cfg.to_args()
    assert [args.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    assert args.moe_intermediate_size == cfg.ffn_hidden_size == args.shared_expert_intermediate_size


@pytest.mark.parametrize("model, message", [
    (dict(num_experts=2, top_k=3), "model.top_k (3) must be at most model.num_experts (2)"),
    (dict(num_experts=2, num_layers=2, first_k_dense=2), "model.first_k_dense (2) and model.moe_every"),
    (dict(num_experts=2, top_k=1), "model.norm_topk_prob=True with top_k=1"),
    (dict(num_experts=2, shared_expert_gate=True), "model.shared_expert_gate needs"),
    (dict(num_experts=2, no_bias=False), "model.mlp_bias"),
    (dict(num_experts=2, router_score="relu"), "router_score"),
    (dict(num_experts=2, capacity_factor=0), "capacity_factor"),
])
def test_bad_moe_keys_are_one_line_naming_the_key(model, message):
    with pytest.raises(SpindleError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        validate_config({"model": dict(hidden_size=64, num_attention_heads=4, **model)})
    assert "\n" not in str(err.value)


def test_model_mixes_layers_sums_aux_losses_and_counts_its_bytes():
    args = moe_args(num_layers=4, first_k_dense=1, moe_every=2, aux_loss_coeff=0.01, z_loss_coeff=0.001,
                    bias_update_rate=0.01, num_shared_experts=1, shared_expert_intermediate_size=8)
    model = build_model(args, seed=0)
    kinds = [type(block.feed_forward).__name__ for block in model.layers.values()]
    assert kinds == ["FeedForward", "MoEFeedForward", "FeedForward", "MoEFeedForward"]
    assert all(torch.all(m.score_bias == 0) for m in model.moe_blocks())  # zeroed after to_empty
    ids = torch.randint(0, 32, (2, 8))
    model(ids)
    blocks = model.moe_blocks()
    torch.testing.assert_close(model.moe_aux_loss, blocks[0].aux_loss + blocks[1].aux_loss)
    model.moe_aux_loss.backward()
    assert model.layers["1"].feed_forward.gate.weight.grad.abs().sum() > 0
    assert weight_bytes(args) == 4 * count_parameters(model) + sum(b.numel() * 4 for b in model.buffers())
    dense = Transformer(replace(args, num_experts=0))
    assert not dense.moe_blocks() and dense.moe_aux_loss is None
