"""The closing line of `spindle train`: losses in nats per token, bits per byte for byte-level data, held-out."""

import math

from spindle.cli.train import loss_summary


def test_loss_summary_in_nats_bits_and_held_out():
    hist = [{"step": i, "loss": 3.0 - 0.01 * i} for i in range(30)]
    hist[19]["val/held_out_loss"] = 1.5
    hist[29]["val/held_out_loss"] = math.log(2) * 1.25  # 1.25 bits per byte
    text = loss_summary(hist, byte_level=True)
    mean = sum(h["loss"] for h in hist[-20:]) / 20
    assert f"{mean:.4f} nats ({mean / math.log(2):.3f} bits/byte) averaged over the last 20" in text
    assert text.startswith("training loss 3.0000 at the first step, 2.7100 at the last")
    assert text.endswith("held-out loss after step 29 held_out 0.8664 nats (1.250 bits/byte)")
    plain = loss_summary(hist[:5], byte_level=False)
    assert "bits" not in plain and "held-out" not in plain and "averaged over the last 5" in plain
