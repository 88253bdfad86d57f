"""Peak memory of `spindle.eval.perplexity.token_losses` (chunked prefill + KV cache) vs length.

Each length runs in a fresh subprocess; peak RSS (ru_maxrss) minus the RSS after building the model and
a 256-token warm-up. Linear growth: the KV cache is (B, Hkv, T, D) per layer and the chunk mask is
(chunk x T); a full T x T mask at 64K tokens would alone take 4 GiB (bool) / 16 GiB (fp32).

    .venv/bin/python experiments/rope_scaling_laws/memory_check.py [--lengths 4096,16384,65536]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import resource, sys, time, torch
sys.path.insert(0, {root!r})
from spindle.config import ModelConfig
from spindle.model.llama import build_model
from spindle.eval.perplexity import token_losses
torch.set_num_threads(2)
cfg = ModelConfig(hidden_size=32, num_attention_heads=1, num_kv_attention_heads=1, num_layers=1, vocab_size=258,
                  mlp_ratio=2, multiple_of=16, max_position_embeddings=256)
m = build_model(cfg.to_args()).eval()
token_losses(m, torch.randint(0, 258, (1, 256)), chunk={chunk})
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
token_losses(m, torch.randint(0, 258, (1, {length})), chunk={chunk})
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter() - t)
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="4096,16384,65536")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.json"))
    a = ap.parse_args()
    rows = []
    for L in map(int, a.lengths.split(",")):
        code = CHILD.format(root=str(ROOT), chunk=a.chunk, length=L)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
        base, peak, secs = int(out[0]), int(out[1]), float(out[2])
        rows.append({"length": L, "chunk": a.chunk, "baseline_rss_mib": base / 1024, "peak_rss_mib": peak / 1024,
                     "extra_mib": (peak - base) / 1024, "seconds": round(secs, 1),
                     "kv_cache_mib": 1 * 2 * L * 32 * 4 / 2**20, "full_LxL_bool_mask_mib": L * L / 2**20})
        print(json.dumps(rows[-1]))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"model": "1 layer, 1 head of 32, fp32, batch 1", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
