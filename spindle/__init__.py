"""Spindle: PyTorch-native LLM pre-training and fine-tuning.

    import spindle
    model, cfg = spindle.load_model("runs/demo/ckpt")   # or a Hugging Face / InternEvo / Meta folder

`load_model` is imported on first use, so `import spindle` (and the CLI) stays light.
"""


def __getattr__(name: str):
    if name == "load_model":
        from spindle.eval.load import load_model

        return load_model
    raise AttributeError(f"module 'spindle' has no attribute {name!r}")


__all__ = ["load_model"]
