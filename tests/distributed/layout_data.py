"""Files some layout jobs read (layout_runs.SETUPS), made once per session in the test process.

- write_ppm_config: real source folders (code, en) and a validation folder, tokenized by tools/tokenizer.py
  (helpers.tokenize: its main(), in this process), and the config of test_layout_metrics.py's runs.
- write_sources: a Qwen3 Hugging Face folder and an InternEvo INTERNLM2_PUBLIC folder (tp2 x pp2), the
  foreign weights test_sharded_load.py loads into sharded models.
"""

from __future__ import annotations

from pathlib import Path

PPM_CONFIG = """
JOB_NAME = "ppm"
data = dict(seq_len=32, micro_num=2, micro_bsz=2, total_steps=4, train_folder={train!r}, valid_folder={valid!r},
            valid_every=2, valid_micro_num=3, min_length=4, seed=7, source_weights={{"code": 1.0, "en": 2.0}})
model = dict(hidden_size=64, num_attention_heads=4, num_kv_attention_heads=2, num_layers=4, vocab_size=1024,
             multiple_of=16, max_position_embeddings=32)
adam = dict(lr=3e-3)
ckpt = dict(enable_save_ckpt=False)
trainer = dict(seed=5, tensorboard=False, progress_bar=False, num_threads=1, log_every=1)
"""
TEXT = {
    "code": "def add(a, b):\n    return a + b\nfor i in range(10): print(i)\nwhile x < 3: x += 1\n",
    "en": "The quick brown fox jumps over the lazy dog.\nLanguage models predict the next token.\n",
}


def write_ppm_config(root: Path) -> Path:
    from helpers import tokenize

    root.mkdir(parents=True)
    for name, text, folder in [("code", TEXT["code"] * 30, "train/code"), ("en", TEXT["en"] * 30, "train/en"),
                               ("held", TEXT["en"] * 8 + TEXT["code"] * 8, "valid/held")]:
        src = root / f"{name}.txt"
        src.write_text(text)
        tokenize(src, root / folder / f"{name}.bin")
    cfg = root / "cfg.py"
    cfg.write_text(PPM_CONFIG.format(train=str(root / "train"), valid=str(root / "valid")))
    return cfg


def write_sources(root: Path) -> None:
    from hf_folders import hf_case
    from internevo_folders import internevo_config_class, make_case

    hf_case("qwen3", head_dim=24).save_pretrained(str(root / "qwen3"))
    with internevo_config_class() as config:
        folder, _ = make_case(root, config, "internlm2_not_adapt_hf", 2, 2)
    folder.parent.rename(root / "internevo")  # make_case writes {case}_tp2_pp2/41: the folder is .../internevo/41
