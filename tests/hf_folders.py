"""Hugging Face model folders for the tests: a family transformers ships, at test size, with weights drawn far
from their init so every tensor's mapping shows in the logits. Used by tests/unit/test_hf_families.py and by
the sharded-load layout test (tests/distributed/layout_data.py)."""

from __future__ import annotations

import torch
import transformers

SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-6)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from init (norms and biases too), so every tensor's mapping shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)


def hf_case(kind: str, **extra):
    """A transformers model of this family (its save_pretrained writes the folder), with randomized weights."""
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[kind]
    rope = extra.pop("rope", None)
    kw = dict(SIZES, max_position_embeddings=extra.pop("max_position_embeddings", 32), **extra)
    if rope is not None:
        kw["rope_parameters"] = dict(rope, rope_theta=kw.pop("rope_theta", 10000.0))
    model = model_cls(cfg_cls(**kw))
    randomize(model, 1)
    return model
