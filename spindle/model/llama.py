"""The InternLM / LLaMA decoder, in one file, read top to bottom.

    tokens -> tok_embeddings -> layers["0"] ... layers["N-1"] -> norm -> output -> logits

Each layer is pre-norm: x + attention(norm(x)), then x + feed_forward(norm(x)).
Attention uses grouped KV heads, RoPE from `position_ids` (cos/sin in fp32) and SDPA.

The model is plain PyTorch: no process groups, no parallel layers. Parallelism (TP/SP, activation
checkpointing, compile, FSDP, pipeline stages) is applied from outside by `spindle.parallel`.
Layers live in an `nn.ModuleDict` keyed by their index, so a pipeline stage that keeps layers
"8".."15" still names them `layers.8...` and checkpoints do not depend on the layout. A stage may
drop `tok_embeddings`, `norm` and `output` (set to None); forward skips what is missing.

Parameter names follow InternLM/LLaMA (wq/wk/wv/wo, w1/w2/w3), which keeps the Hugging Face
mapping in `spindle.checkpoint.hf` one line per tensor.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from spindle.config import ModelConfig
from spindle.model.attention import attention, cached_layout, dense_layout, document_layout
from spindle.model.loss import TokenLosses, linear_cross_entropy
from spindle.model.rope import RotaryEmbedding, apply_rotary


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm_type == "rmsnorm":
        return nn.RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon, bias=not cfg.no_bias)


@dataclass
class LayerCache:
    """Keys and values of one layer for incremental decoding: (B, Hkv, T, D), T grows.

    `k` and `v` are views of buffers that double when full, so filling a cache of T tokens chunk by
    chunk copies O(T) bytes (concatenating at every chunk would copy O(T^2 / chunk)). Inference only:
    the buffers are written in place."""

    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None
    positions: Optional[torch.Tensor] = None  # (B, T) absolute positions of the cached keys
    buffers: Optional[tuple[torch.Tensor, torch.Tensor]] = field(default=None, repr=False)

    def extend(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        old = 0 if self.k is None else self.k.shape[2]
        new = old + k.shape[2]
        if self.buffers is None or new > self.buffers[0].shape[2]:
            size = max(new, 2 * old)
            grown = tuple(t.new_empty(*t.shape[:2], size, t.shape[3]) for t in (k, v))
            if old:
                grown[0][:, :, :old], grown[1][:, :, :old] = self.k, self.v
            self.buffers = grown
        self.buffers[0][:, :, old:new], self.buffers[1][:, :, old:new] = k, v
        self.k, self.v = self.buffers[0][:, :, :new], self.buffers[1][:, :, :new]
        self.positions = positions if self.positions is None else torch.cat([self.positions, positions], dim=1)
        return self.k, self.v, self.positions


@dataclass
class KVCache:
    """One LayerCache per layer index; `length` is how many positions have been consumed."""

    layers: dict[str, LayerCache] = field(default_factory=dict)

    def layer(self, name: str) -> LayerCache:
        return self.layers.setdefault(name, LayerCache())

    @property
    def length(self) -> int:
        first = next(iter(self.layers.values()), None)
        return 0 if first is None or first.k is None else first.k.shape[2]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim
        bias = not cfg.no_bias
        self.wq = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.dropout = cfg.attn_drop_rate
        # the attention kernel; context parallelism swaps in one that gathers keys across ranks
        self.kernel = attention

    def forward(self, x, cos, sin, q_scale, layout, cache: Optional[LayerCache] = None, positions=None):
        b, l, _ = x.shape
        # view(b, l, -1, hd): under tensor parallelism the local head count is smaller
        q = self.wq(x).view(b, l, -1, self.head_dim)
        k = self.wk(x).view(b, l, -1, self.head_dim)
        v = self.wv(x).view(b, l, -1, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if q_scale is not None:  # log-scaled attention: scaling q scales that query's logits
            q = q * q_scale[:, :, None, None].to(q.dtype)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
        if cache is not None:  # the new keys go last: the kernel's causal mask is aligned to the lower right
            k, v, _ = cache.extend(k, v, positions)
        out = self.kernel(q, k, v, layout, self.dropout if self.training else 0.0)
        return self.wo(out.transpose(1, 2).reshape(b, l, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); or a plain GELU MLP when use_swiglu is False."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bias = not cfg.no_bias
        hidden = cfg.ffn_hidden_size
        self.swiglu = cfg.use_swiglu
        self.w1 = nn.Linear(cfg.hidden_size, hidden, bias=bias)
        self.w3 = nn.Linear(cfg.hidden_size, hidden, bias=bias) if self.swiglu else None
        self.w2 = nn.Linear(hidden, cfg.hidden_size, bias=bias)

    def forward(self, x):
        if self.swiglu:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = make_norm(cfg)
        self.attention = Attention(cfg)
        self.ffn_norm = make_norm(cfg)
        self.feed_forward = FeedForward(cfg)
        self.post_norm = cfg.apply_post_layer_norm
        self.dropout = nn.Dropout(cfg.drop_rate)

    def forward(self, x, cos, sin, q_scale, layout, cache=None, positions=None):
        if self.post_norm:  # original-Transformer ordering, kept for InternEvo's apply_post_layer_norm
            x = self.attention_norm(x + self.dropout(self.attention(x, cos, sin, q_scale, layout, cache, positions)))
            return self.ffn_norm(x + self.dropout(self.feed_forward(x)))
        x = x + self.dropout(self.attention(self.attention_norm(x), cos, sin, q_scale, layout, cache, positions))
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.num_layers)})
        self.norm = make_norm(cfg)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(
            head_dim=cfg.head_dim,
            base=cfg.rope_base,
            scaling=cfg.effective_rope_scaling(),
            max_position_embeddings=cfg.max_position_embeddings,
            logn_ref_len=(cfg.logn_ref_len or cfg.max_position_embeddings) if cfg.logn_attn else None,
        )
        self.tie_weights()

    def tie_weights(self) -> None:
        # `to_empty` materialises each module's parameters separately, so re-tie after it
        if self.cfg.tie_word_embeddings and self.output is not None and self.tok_embeddings is not None:
            self.output.weight = self.tok_embeddings.weight

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Seeded init, after `to_empty()` from the meta device.

        Each tensor draws from its own generator seeded by (seed, parameter name), so a parameter
        gets the same values whatever the layout: a pipeline stage holding only layers 8..15
        initialises them exactly as the full model would.
        """
        self.rotary.reset_parameters()
        n_layers = self.cfg.num_layers
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            else:
                # residual-branch outputs get std / sqrt(2 * layers) so the residual stream's
                # variance does not grow with depth (GPT-2 / Megatron "scaled init")
                std = self.cfg.init_std
                if name.endswith(("wo.weight", "w2.weight")):
                    std /= math.sqrt(2 * n_layers)
                gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                values = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
                p.copy_(values.to(dtype=p.dtype))

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        seq_len: Optional[int] = None,
        labels: Optional[torch.Tensor] = None,
        label_smoothing: float = 0.0,
    ) -> torch.Tensor | TokenLosses:
        """input_ids (B, L) -> logits (B, L, V); with `labels` (B, L) -> TokenLosses instead.

        A pipeline stage without embeddings receives hidden states (B, L, H) in `input_ids`.
        `position_ids` restart at every document of a pack, and that is where attention finds the
        documents (`spindle.model.attention.document_layout`: one host sync per forward, shared by
        all layers). `cu_seqlens` is accepted and not read: the boundaries it would repeat come from
        `position_ids`. With a `cache`, the input continues the cached tokens, `position_ids` are absolute and
        `seq_len` (the total context, for dynamic RoPE scaling) defaults to max position + 1.
        With `labels` (-100 where no loss) the head and the cross-entropy run fused over token
        chunks (`spindle.model.loss`): the summed loss (label-smoothed if asked), per-token plain
        cross-entropy and argmax hits, no logits.
        """
        h = self.tok_embeddings(input_ids) if self.tok_embeddings is not None else input_ids
        b, l = input_ids.shape[:2]  # not h's: under sequence parallelism h holds only this rank's slice
        if cache is not None:
            layout = cached_layout(b, l, h.device)
        elif position_ids is None:
            layout = dense_layout(b, l, h.device)
        else:
            layout = document_layout(position_ids)
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = torch.arange(start, start + l, device=h.device).expand(b, l)
        cos, sin, q_scale = self.rotary(position_ids, seq_len)
        for name, layer in self.layers.items():
            layer_cache = cache.layer(name) if cache is not None else None
            h = layer(h, cos, sin, q_scale, layout, layer_cache, position_ids if cache is not None else None)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is None:
            return h
        if labels is not None:
            return linear_cross_entropy(h, self.output.weight, labels, label_smoothing=label_smoothing)
        return self.output(h)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", seed: int = 0) -> Transformer:
    """Construct on the meta device (no memory touched), then materialise and init on `device`."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(seed)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
