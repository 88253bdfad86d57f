"""Continued training at a new RoPE base from an existing checkpoint: the procedure of "Scaling Laws of
RoPE-based Extrapolation" (Liu et al., ICLR 2024; docs/long-context.md).

Take a pre-trained model, load its weights only (fresh optimizer, schedule and data order), change the
rotary base (or add rope_scaling), optionally lengthen the training context, and train briefly at a low
constant learning rate. The paper tunes LLaMA2 for 1K steps at 4K (or 16K) tokens; the extrapolation bound
after tuning at the original length is 2*pi*beta^(d_extra/d) (`spindle rope --head-dim D --train-len T`).

As written it continues the embedded demo (`spindle train` with no arguments writes runs/demo/ckpt/800):

    spindle train                                          # the demo: base 10^4, 256 tokens
    spindle train --config configs/continue_rope.py        # base 10^6, 256 tokens, 200 steps
    spindle eval ppl --ckpt runs/continue_rope/ckpt/200 --data <held-out text> --lengths 256,512,...,16384

Point it elsewhere from the command line, e.g. a longer tuning length and another base:

    spindle train --config configs/continue_rope.py --set ckpt.load_ckpt_info.path=runs/other/ckpt/1000 \
        model.rope_base=500 data.seq_len=1024 data.micro_bsz=2 model.max_position_embeddings=1024

What is loaded: `content=("model",)` loads the weights only; "all" would also restore the optimizer,
the LR schedule position and the data position (a resume, not a continued training). RoPE has no weights,
so any base or scaling can be set on top of the loaded model. `auto_resume=False` keeps a stale checkpoint
of this job from overriding load_ckpt_info. The model shape keys must match the checkpoint.

`model.rope_scaling` (e.g. dict(type="yarn", factor=4, original_max_position_embeddings=256)) can be set
the same way instead of, or on top of, a new base.
"""

from spindle.configs import demo  # the demo's model shape and data, in one place

JOB_NAME = "continue_rope"
INIT_CKPT = "runs/demo/ckpt"  # the newest complete step of the demo (or a step folder, e.g. runs/demo/ckpt/800)
NEW_ROPE_BASE = 1_000_000  # the paper's larger-base regime; try 500 (< T/(2*pi) ... smaller-base regime) too
SEQ_LEN = 256  # tuning length: = the pre-training length for the paper's 4K setting; longer for its 16K setting
TOTAL_STEPS = 200

ckpt = dict(
    enable_save_ckpt=True,
    checkpoint_every=float("inf"),
    auto_resume=False,
    load_ckpt_info=dict(path=INIT_CKPT, content=("model",)),  # weights only
)

data = dict(
    demo.data,  # the demo's files and byte tokenizer (the checkpoint's embedding has its 258 rows), held-out set
    seq_len=SEQ_LEN,
    total_steps=TOTAL_STEPS,
    valid_every=TOTAL_STEPS // 2,
    pack_sample_into_one=True,  # full windows of SEQ_LEN positions: every position up to SEQ_LEN is trained
    seed=4321,  # a different data order than the pre-training
)

# low constant LR after a short warm-up (cosine from lr to eta_min = lr is constant)
adam = dict(lr=3e-4, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.1)
lr_scheduler = dict(warmup_ratio=0.1, eta_min=3e-4)
hybrid_zero_optimizer = dict(clip_grad_norm=1.0)

# the demo model's shape (must match the checkpoint), with the new base
model = dict(demo.model, rope_base=NEW_ROPE_BASE, max_position_embeddings=SEQ_LEN)

parallel = dict(zero1=1, tensor=1, pipeline=dict(size=1), sequence_parallel=False)

trainer = dict(run_folder="runs", seed=4321, log_every=20, sample_prompt="import ", sample_tokens=40)
