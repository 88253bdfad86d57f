"""Per-frequency-pair diagnostic (rope.md §4.5 item 4): how much of q·k magnitude lives in the pairs past the
critical dimension (pair index >= d_extra/2 = 13), for every trained model of the study.

The share is mean(|q_n|·|k_n|) over pairs n >= 13 divided by the sum over all 32 pairs. The norm of a
pair is rotation-invariant, so it is measured before RoPE on the first 256 bytes of the held-out windows.
Writes results/pair_share.json.

    .venv/bin/python experiments/rope_scaling_laws/pair_share.py
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import run  # noqa: E402
import stages  # noqa: E402
import study  # noqa: E402
from spindle.eval.load import load_model_for_eval  # noqa: E402
from spindle.ropelaws import critical_dim  # noqa: E402


def pair_share(ckpt: str, x: torch.Tensor, first: int) -> list[list[float]]:
    model, cfg = load_model_for_eval(ckpt)
    d = cfg.model.head_dim
    qs, ks = {}, {}
    for name, layer in model.layers.items():
        layer.attention.wq.register_forward_hook(lambda m, i, o, n=name: qs.__setitem__(n, o))
        layer.attention.wk.register_forward_hook(lambda m, i, o, n=name: ks.__setitem__(n, o))
    with torch.no_grad():
        model(x)
    out = []
    for n in qs:
        q = qs[n].view(*qs[n].shape[:2], -1, d)
        k = ks[n].view(*ks[n].shape[:2], -1, d)
        h = d // 2  # rotate_half layout: pair j = dims (j, j + d/2)
        e = (q[..., :h].pow(2) + q[..., h:].pow(2)).sqrt().mean((0, 1)) * \
            (k[..., :h].pow(2) + k[..., h:].pow(2)).sqrt().mean((0, 1))
        out.append([round(float(v), 4) for v in e[:, first:].sum(-1) / e.sum(-1)])
    return out


def main() -> None:
    torch.set_num_threads(2)
    p = dict(run.FULL)
    wins, _ = study.eval_windows(p)
    first = critical_dim(stages.HEAD_DIM, stages.T_TRAIN) // 2
    res = {"pairs_from": first, "n_pairs": stages.HEAD_DIM // 2, "models": {}}
    for m in study.model_list(p):
        ck = stages.final_checkpoint(m["name"])
        if ck is not None:
            res["models"][m["name"]] = {"base": m["base"],
                                        "share_per_layer_head": pair_share(str(ck), wins[:, :256], first)}
            print(m["name"], res["models"][m["name"]]["share_per_layer_head"])
    (HERE / "results" / "pair_share.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
