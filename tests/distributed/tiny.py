# A toy model and random data for the multi-process parity tests (hidden 64, 4 layers). Byte-level vocabulary
# (258 ids): every run ends with a sample of the trained model, gathered whole under its layout.
JOB_NAME = "tiny"
data = dict(seq_len=32, micro_bsz=2, micro_num=4, total_steps=10, train_folder=None, seed=11, tokenizer_path="byte")
model = dict(hidden_size=64, num_attention_heads=4, num_kv_attention_heads=2, num_layers=4, vocab_size=258,
             multiple_of=16, max_position_embeddings=32, dtype="torch.float32")
adam = dict(lr=3e-3, weight_decay=0.01)
lr_scheduler = dict(warmup_ratio=0.2, eta_min=1e-4)
hybrid_zero_optimizer = dict(clip_grad_norm=1.0)
parallel = dict(zero1=1, tensor=1, pipeline=dict(size=1))
trainer = dict(seed=5, tensorboard=False, progress_bar=False, num_threads=1, sample_prompt="import ", sample_tokens=8)
