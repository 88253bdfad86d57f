"""Foreign formats, both ways: Hugging Face folders (every family of the table in `families.py`, the tokenizer
written beside exported weights, a run that starts from a folder), InternEvo's checkpoint folders and Meta's
Llama folders. Spindle's own checkpoints (DCP, the completion record, the save folder) are `spindle.checkpoint`,
the layer below: this package reads and writes through it and it never imports this one."""
