"""The embedded default: `spindle train` with no arguments runs this.

A 1.7M-parameter InternLM/LLaMA model trained on the Python standard library's own source files
(present on every machine with Python, so nothing is downloaded), read as bytes with Spindle's
built-in byte-level tokenizer (vocabulary 256 + BOS/EOS; no file, nothing to download), with the
last 200 kB of those files held out and validated on. About three minutes on a 2-core CPU.

Why this size: at a fixed three minutes on 2 cores a smaller model that takes more steps learns more
than a larger one (docs/LOG.md, "The demo's size"): d256 x 4 layers reached 2.26 nats per byte in
412 steps, d192 x 4 layers 1.84 in 683 steps of the same wall time. Why bytes and not the packaged
BPE (vocabulary 1024): a larger vocabulary asks for much more per byte from a model this small.
"""

import sysconfig

JOB_NAME = "demo"
SEQ_LEN = 256
HIDDEN_SIZE = 192
NUM_ATTENTION_HEAD = 4
NUM_KV_ATTENTION_HEAD = 2
MLP_RATIO = 8 / 3
NUM_LAYER = 4
VOCAB_SIZE = 258  # 256 bytes + BOS + EOS
TOTAL_STEPS = 800

# the stdlib's .py files, one document per file; test suites excluded
TRAIN_FOLDER = sysconfig.get_paths()["stdlib"]

ckpt = dict(
    enable_save_ckpt=True,  # to {run_folder}/{JOB_NAME}/ckpt (save_ckpt_folder unset)
    checkpoint_every=float("inf"),  # only the final weights
    auto_resume=False,  # a fresh demo every time
)

data = dict(
    type="text",
    train_folder=TRAIN_FOLDER,
    text_glob="*.py",  # the top-level modules: about 6 MB of code
    max_text_bytes=3_000_000,  # more than the run reads; keeps the one-time tokenization short
    text_valid_bytes=200_000,  # the last files (never trained on): the held-out loss
    valid_every=TOTAL_STEPS // 4,
    valid_micro_num=8,  # micro-batches per evaluation call
    valid_max_tokens=16_384,  # of the ~184K held-out tokens: keeps the demo fast (the line says "N of M tokens")
    text_exclude=("test", "tests", "idle_test", "site-packages"),
    tokenizer_path="byte",
    seq_len=SEQ_LEN,
    micro_num=1,
    micro_bsz=8,
    total_steps=TOTAL_STEPS,
    pack_sample_into_one=False,
    min_length=0,
)

adam = dict(lr=5e-3, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.1)

lr_scheduler = dict(total_steps=TOTAL_STEPS, init_steps=0, warmup_ratio=0.03, eta_min=3e-4)

hybrid_zero_optimizer = dict(clip_grad_norm=1.0)

model = dict(
    num_attention_heads=NUM_ATTENTION_HEAD,
    num_kv_attention_heads=NUM_KV_ATTENTION_HEAD,
    hidden_size=HIDDEN_SIZE,
    num_layers=NUM_LAYER,
    mlp_ratio=MLP_RATIO,
    multiple_of=64,
    vocab_size=VOCAB_SIZE,
    dtype="torch.float32",  # bf16/fp16 matmuls are 8-500x slower on AVX2-only CPUs
    norm_type="rmsnorm",
    rope_base=10000,
    max_position_embeddings=SEQ_LEN,
    checkpoint=False,
)

# per-batch losses vary a lot between source files: alert only on real blow-ups
monitor = dict(alert=dict(loss_spike_ratio=3.0))

parallel = dict(zero1=1, tensor=1, pipeline=dict(size=1), sequence_parallel=False)

trainer = dict(
    run_folder="runs",
    seed=1024,
    log_every=10,
    sample_prompt="import ",
    sample_tokens=40,
)
