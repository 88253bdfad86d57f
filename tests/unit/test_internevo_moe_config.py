"""InternEvo's MoE config keys (model_type INTERNLM_MoE, model.num_experts / moe_type / moe_use_residual, the `moe`
section, loss.moe_loss_coeff): each one maps onto Spindle's MoE keys, says it does nothing here, or is refused in
one line (spindle/config/internevo.py translate_moe; docs/moe.md "InternEvo configs")."""

from __future__ import annotations

from pathlib import Path

import pytest

from spindle.config import load_config, validate_config
from spindle.errors import SpindleError

FIXTURE = Path(__file__).parents[1] / "fixtures" / "internevo_7B_MoE4_sft.py"
MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 128, "num_experts": 4}
KEYS = ("num_experts", "top_k", "norm_topk_prob", "capacity_factor", "min_capacity", "aux_loss_coeff")


def config(moe=None, model=None, loss=None, model_type="INTERNLM_MoE"):
    raw = {"model_type": model_type, "model": dict(MODEL, **(model or {}))}
    if moe is not None:
        raw["moe"] = moe
    if loss is not None:
        raw["loss"] = loss
    return raw


def notes_of(cfg) -> str:
    return "; ".join(cfg._compat_notes)


# (config, the model keys it gives (num_experts, top_k, norm_topk_prob, capacity_factor, min_capacity,
#  aux_loss_coeff; None: not checked), a note it prints)
MAPPED = [
    ("GShard top-1, RTS off", config({"top_k": 1, "use_rts": False}), (4, 1, False, 1.0, 4, 1.0), None),
    ("GShard top-2", config({"top_k": 2}), (4, 2, True, 1.0, 4, 1.0), "model.moe_type='GShard' top-2 (mapped"),
    ("capacity and minimum", config({"top_k": 2, "capacity_factor": 1.25, "min_capacity": 2}, loss={
        "moe_loss_coeff": 0.1}), (4, 2, True, 1.25, 2, 0.1), None),
    ("top-2 drop_tokens=False", config({"top_k": 2, "drop_tokens": False}), (4, 2, True, None, None, 1.0),
     "moe.drop_tokens=False (dropless here; InternEvo's top-2 gate ignores it"),
    ("top-1 dropless: RTS idle", config({"top_k": 1, "drop_tokens": False, "use_rts": True}),
     (4, 1, False, None, None, 1.0), "moe.use_rts (no effect: dropless)"),
    ("eval capacity", config({"top_k": 1, "use_rts": False, "eval_capacity_factor": 2.0}), (4, 1, False, 1.0, 4, 1.0),
     "moe.eval_capacity_factor=2.0 (no effect: validation runs at capacity_factor 1.0"),
    ("top-2 noise key", config({"top_k": 2, "noisy_gate_policy": "RSample", "use_rts": True}),
     (4, 2, True, 1.0, 4, 1.0), "moe.noisy_gate_policy (no effect: only InternEvo's top-1 gate reads it)"),
    ("noise None as text", config({"top_k": 1, "use_rts": False, "noisy_gate_policy": "None"}),
     (4, 1, False, 1.0, 4, 1.0), None),
    ("top-3", config({"top_k": 3}), (4, 3, True, 1.0, 4, 1.0), "moe.top_k=3 (InternEvo's GShard gate takes 1 or 2"),
    ("MegaBlock", config({"top_k": 2, "capacity_factor": 2.0}, {"moe_type": "MegaBlock"}), (4, 2, True, 2.0, 0, 1.0),
     "model.moe_type='MegaBlock' (mapped; capacity rounds up here"),
    ("MegaBlock dropless", config({"top_k": 2, "drop_tokens": False}, {"moe_type": "MegaBlock"}),
     (4, 2, True, None, None, 1.0), None),
    ("MegaBlock-D", config({"top_k": 2, "parallel_mode": "weight"}, {"moe_type": "MegaBlock-D"}),
     (4, 2, True, None, None, 1.0), "moe.parallel_mode (no effect"),
    ("the model's own top_k over InternEvo's default", config({"use_rts": False}, {"top_k": 2}),
     (4, 2, True, 1.0, 4, 1.0), None),
    ("the model's own aux_loss_coeff over InternEvo's default", config({"top_k": 2}, {"aux_loss_coeff": 0.02}),
     (4, 2, True, 1.0, 4, 0.02), None),
    ("num_experts=1 is dense", config(None, {"num_experts": 1}), (0, None, None, None, None, None),
     "model.num_experts=1 (InternEvo's dense model"),
    ("no experts: moe idle", config({"top_k": 2}, {"num_experts": 0}), (0, None, None, None, None, None),
     "moe (the model has no experts"),
    ("dense INTERNLM: loss key idle", config(None, {"num_experts": 0}, {"moe_loss_coeff": 0.1}, "INTERNLM"),
     (0, None, None, None, None, None), "loss.moe_loss_coeff (the model has no experts"),
    ("a Spindle MoE takes loss.moe_loss_coeff", config(None, {"num_experts": 4}, {"moe_loss_coeff": 0.3}, "INTERNLM"),
     (4, 2, True, None, 4, 0.3), None),
]


@pytest.mark.parametrize("raw, want, note", [c[1:] for c in MAPPED], ids=[c[0] for c in MAPPED])
def test_each_key_maps_or_says_it_does_nothing(raw, want, note):
    cfg = validate_config(raw, "moe.py")
    got = tuple(getattr(cfg.model, k) for k in KEYS)
    assert all(w is None or g == w for g, w in zip(got, want)), got
    if want[3] is None and want[0]:
        assert cfg.model.capacity_factor is None  # dropless
    if note is not None:
        assert note in notes_of(cfg), notes_of(cfg)
    again = validate_config(cfg.to_dict(), "config.json")  # a saved run's config.json reads back the same
    assert again.model == cfg.model


REFUSED = [
    ("InternEvo's default RTS with top-1", config(None), "moe.use_rts=True (InternEvo's default): random token"),
    ("RTS with top-1", config({"top_k": 1, "use_rts": True}), "moe.use_rts=True: random token selection"),
    ("noisy top-1", config({"top_k": 1, "use_rts": False, "noisy_gate_policy": "Jitter"}),
     "moe.noisy_gate_policy='Jitter': noisy gating"),
    ("top_k over experts", config({"top_k": 5}), "moe.top_k (5) must be at most model.num_experts (4)"),
    ("MegaBlock's missing key", config({"top_k": 2, "min_capacity": 4}, {"moe_type": "MegaBlock"}),
     "moe.min_capacity: InternEvo's MegaBlock MoE layer (model.moe_type) takes no min_capacity"),
    ("MegaBlock-D capacity", config({"top_k": 2, "capacity_factor": 1.0}, {"moe_type": "MegaBlock-D"}),
     "takes no capacity_factor"),
    ("MegaBlock top-1", config({"top_k": 1}, {"moe_type": "MegaBlock"}), "moe.top_k=1 with model.moe_type='MegaBlock'"),
    ("residual MoE", config({"top_k": 2}, {"moe_use_residual": True}), "model.moe_use_residual=True: DeepSpeed's"),
    ("both loss weights", config({"top_k": 2}, {"aux_loss_coeff": 0.5}, {"moe_loss_coeff": 0.1}),
     "model.aux_loss_coeff=0.5 but loss.moe_loss_coeff gives 0.1"),
    ("both top_k", config({"top_k": 2}, {"top_k": 1}), "model.top_k=1 but moe.top_k gives 2"),
    ("a bad moe value", config({"top_k": "two"}), "moe.top_k: expected an integer"),
    ("an unknown moe key", config({"top_k": 2, "topk": 2}), "moe.topk: unknown key"),
    ("an unknown moe_type", config({"top_k": 2}, {"moe_type": "Switch"}), "model.moe_type: Input should be"),
]


@pytest.mark.parametrize("raw, message", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_what_would_train_differently_is_refused_in_one_line(raw, message):
    with pytest.raises(SpindleError) as err:
        validate_config(raw, "moe.py")
    assert message in str(err.value) and "\n" not in str(err.value) and str(err.value).startswith("moe.py: ")


def test_internevo_7B_MoE4_config_maps_every_moe_key():
    cfg = load_config(FIXTURE)
    m = cfg.model
    assert (cfg.model_type, m.num_experts, m.top_k, m.norm_topk_prob, m.capacity_factor, m.min_capacity,
            m.aux_loss_coeff, m.moe_type) == ("INTERNLM_MoE", 4, 2, True, 1.0, 4, 0.1, "GShard")
    assert m.moe_intermediate_size is None and m.to_args().moe_intermediate_size == 5632  # int(4096 * 4/3) -> 256s
    notes = notes_of(cfg)
    for said in ("moe.noisy_gate_policy" not in notes, "moe.use_rts (no effect: only InternEvo's top-1" in notes,
                 "model.moe_type='GShard' top-2 (mapped" in notes, "eval_capacity_factor" not in notes):
        assert said, notes

