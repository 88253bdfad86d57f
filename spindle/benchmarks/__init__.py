"""Benchmarks that `spindle bench NAME` runs: Spindle against outside baselines (transformers, a hand-written
loop, a seed-style tokenizer). Figures and the commands that produced them: docs/benchmarks.md."""
