"""The InternLM / LLaMA decoder, in one file, read top to bottom.

    tokens -> tok_embeddings -> layers["0"] ... layers["N-1"] -> norm -> output -> logits

Each layer is pre-norm: x + attention(norm(x)), then x + feed_forward(norm(x)).
Attention uses grouped KV heads, RoPE from `position_ids` (cos/sin in fp32) and SDPA.

The model is plain PyTorch: no process groups, no parallel layers. Parallelism (TP/SP, activation
checkpointing, compile, FSDP, pipeline stages) is applied from outside by `spindle.parallel`.
Layers live in an `nn.ModuleDict` keyed by their index, so a pipeline stage that keeps layers
"8".."15" still names them `layers.8...` and checkpoints do not depend on the layout. A stage may
drop `tok_embeddings`, `norm` and `output` (set to None); forward skips what is missing.

The model takes a plain `ModelArgs` (every size resolved, every switch explicit); the config
section turns into one with `ModelConfig.to_args()`. The switches cover the families Spindle reads
and writes (Llama, Mistral, Qwen2/3, InternLM 1/2): a bias per projection group (q/k/v, o, MLP),
RMSNorm of q and k over each head (Qwen3), a head_dim that is not hidden / heads, and Mistral's
sliding window, which is refused (one line) for any sequence longer than the window: within the
window it is exact causal attention.

Parameter names follow InternLM/LLaMA (wq/wk/wv/wo, w1/w2/w3, attention.q_norm/k_norm), which keeps
the Hugging Face mapping in `spindle.checkpoint.families` one line per tensor.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, distribute_tensor

from spindle.config.model_args import ModelArgs  # noqa: F401 (the model's arguments: a plain dataclass)
from spindle.errors import SpindleError
from spindle.hardware import refuse_unless_fits
from spindle.model.attention import HostLayout, attention, cached_layout, dense_layout, document_layout
from spindle.model.loss import TokenLosses, linear_cross_entropy
from spindle.model.moe import MoEFeedForward
from spindle.model.rotary import RotaryEmbedding, apply_rotary


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm computed in fp32 under mixed precision, returned in its input's dtype (so are the norms
    of every layout: docs/parallelism.md, "Mixed precision")."""

    def forward(self, x):
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computed in fp32 under mixed precision, returned in its input's dtype."""

    def forward(self, x):
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), bias, self.eps).to(x.dtype)


def make_norm(args: ModelArgs, dim: Optional[int] = None) -> nn.Module:
    if args.norm_type == "rmsnorm":
        return RMSNorm(dim or args.hidden_size, eps=args.layer_norm_epsilon)
    return LayerNorm(dim or args.hidden_size, eps=args.layer_norm_epsilon, bias=args.norm_bias)


def check_within_window(position_ids: torch.Tensor, window: int, span: Optional[int] = None) -> None:
    """Refuse attention spans longer than the sliding window (positions count from each document's
    start, or from the cache's, so max + 1 is the longest span any query attends over). `span`: that
    max + 1 when the layout already read it (no second host sync)."""
    span = int(position_ids.max().item()) + 1 if span is None else span
    if span > window:
        raise SpindleError(f"sequence of {span} positions exceeds model.sliding_window={window}: sliding-window "
                           "attention is not implemented (it equals causal attention only within the window); "
                           "use sequences of at most the window")


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
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_kv_heads, args.head_dim
        h, q_dim, kv_dim = args.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.wq = nn.Linear(h, q_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(h, kv_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(h, kv_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(q_dim, h, bias=args.o_bias)
        self.q_norm = make_norm(args, self.head_dim) if args.qk_norm else None
        self.k_norm = make_norm(args, self.head_dim) if args.qk_norm else None
        self.dropout = args.attn_drop_rate
        # the attention kernel; context parallelism swaps in one that gathers keys across ranks
        self.kernel = attention

    def forward(self, x, cos, sin, q_scale, layout, cache: Optional[LayerCache] = None, positions=None):
        b, l, _ = x.shape
        # view(b, l, -1, hd): under tensor parallelism the local head count is smaller
        q = self.wq(x).view(b, l, -1, self.head_dim)
        k = self.wk(x).view(b, l, -1, self.head_dim)
        v = self.wv(x).view(b, l, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if q_scale is not None:  # log-scaled attention: scaling q scales that query's logits (in fp32)
            q = (q.float() * q_scale[:, :, None, None]).to(q.dtype)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
        if cache is not None:  # the new keys go last: the kernel's causal mask is aligned to the lower right
            k, v, _ = cache.extend(k, v, positions)
        out = self.kernel(q, k, v, layout, self.dropout if self.training else 0.0)
        return self.wo(out.transpose(1, 2).reshape(b, l, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); or a plain GELU MLP when use_swiglu is False."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        bias, hidden = args.mlp_bias, args.ffn_hidden_size
        self.swiglu = args.use_swiglu
        self.w1 = nn.Linear(args.hidden_size, hidden, bias=bias)
        self.w3 = nn.Linear(args.hidden_size, hidden, bias=bias) if self.swiglu else None
        self.w2 = nn.Linear(hidden, args.hidden_size, bias=bias)

    def forward(self, x):
        if self.swiglu:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, index: int = 0):
        super().__init__()
        self.attention_norm = make_norm(args)
        self.attention = Attention(args)
        self.ffn_norm = make_norm(args)
        # the layer pattern (first_k_dense, moe_every) says which layers are mixtures of experts
        self.feed_forward = MoEFeedForward(args) if args.is_moe_layer(index) else FeedForward(args)
        self.post_norm = args.apply_post_layer_norm
        self.dropout = nn.Dropout(args.drop_rate)

    def forward(self, x, cos, sin, q_scale, layout, cache=None, positions=None):
        if self.post_norm:  # original-Transformer ordering, kept for InternEvo's apply_post_layer_norm
            x = self.attention_norm(x + self.dropout(self.attention(x, cos, sin, q_scale, layout, cache, positions)))
            return self.ffn_norm(x + self.dropout(self.feed_forward(x)))
        x = x + self.dropout(self.attention(self.attention_norm(x), cos, sin, q_scale, layout, cache, positions))
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleDict({str(i): Block(args, i) for i in range(args.num_layers)})
        # after each forward of an MoE model: the sum of its MoE layers' balance losses, for the trainer to add
        self.moe_aux_loss: Optional[torch.Tensor] = None
        self.norm = make_norm(args)
        self.output = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(
            head_dim=args.head_dim,
            base=args.rope_base,
            scaling=args.rope_scaling,
            max_position_embeddings=args.max_position_embeddings,
            logn_ref_len=args.logn_ref_len,
        )
        self.tie_weights()

    def tie_weights(self) -> None:
        # `to_empty` materialises each module's parameters separately, so re-tie after it
        if self.args.tie_word_embeddings and self.output is not None and self.tok_embeddings is not None:
            self.output.weight = self.tok_embeddings.weight

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Seeded init, after `to_empty()` from the meta device.

        Each tensor draws from its own generator seeded by (seed, parameter name), so a parameter
        gets the same values whatever the layout: a pipeline stage holding only layers 8..15
        initialises them exactly as the full model would, and a parameter sharded by tensor
        parallelism or FSDP (a DTensor) draws its whole tensor on the CPU and keeps its own shard.
        Names are the plain model's: activation checkpointing and compile wrap blocks under extra
        name segments, which are skipped.
        """
        self.rotary.reset_parameters()
        for moe in self.moe_blocks():
            moe.reset_buffers()
        n_layers = self.args.num_layers
        for name, p in self.named_parameters():
            name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            else:
                # residual-branch outputs get std / sqrt(2 * layers) so the residual stream's
                # variance does not grow with depth (GPT-2 / Megatron "scaled init")
                std = self.args.init_std
                if name.endswith(("wo.weight", "w2.weight")):
                    std /= math.sqrt(2 * n_layers)
                gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                values = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
                copy_whole(values.to(dtype=p.dtype), p)

    def moe_blocks(self) -> list[MoEFeedForward]:
        """This model's (or pipeline stage's) MoE feed-forward blocks; `update_bias()` on each after an
        optimizer step is aux-loss-free balancing."""
        return [m for m in self.modules() if isinstance(m, MoEFeedForward)]

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        seq_len: Optional[int] = None,
        labels: Optional[torch.Tensor] = None,
        label_smoothing: float = 0.0,
        documents: Optional[HostLayout] = None,
    ) -> torch.Tensor | TokenLosses:
        """input_ids (B, L) -> logits (B, L, V); with `labels` (B, L) -> TokenLosses instead.

        A pipeline stage without embeddings receives hidden states (B, L, H) in `input_ids`.
        `position_ids` restart at every document of a pack, and that is where attention finds the
        documents: in `documents`, read from them on the host by the loader (no host sync), else
        from the device (`spindle.model.attention.document_layout`: one host sync per forward, shared
        by all layers and the RoPE scaling). With a `cache`, the input continues the cached tokens,
        `position_ids` are absolute and `seq_len` (the total context, for dynamic RoPE scaling)
        defaults to max position + 1.
        With `labels` (-100 where no loss) the head and the cross-entropy run fused over token
        chunks (`spindle.model.loss`): the summed loss (label-smoothed if asked), per-token plain
        cross-entropy and argmax hits, no logits.
        """
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(input_ids)
            if self.args.embed_grad_scale != 1:  # same values forward, gradient times the scale (GLM-130B's trick)
                g = self.args.embed_grad_scale
                h = g * h + (1 - g) * h.detach()
        else:
            h = input_ids
        b, l = input_ids.shape[:2]  # not h's: under sequence parallelism h holds only this rank's slice
        if cache is not None:
            layout = cached_layout(b, l, h.device)
        elif position_ids is None:
            layout = dense_layout(b, l, h.device)
        elif documents is not None:
            if documents.positions.shape != (b, l):
                raise ValueError(f"documents of shape {documents.positions.shape} for a batch of {(b, l)}")
            layout = documents.on(h.device)
        else:
            layout = document_layout(position_ids)
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = torch.arange(start, start + l, device=h.device).expand(b, l)
        if self.args.sliding_window is not None:
            check_within_window(position_ids, self.args.sliding_window, layout.span)
        cos, sin, q_scale = self.rotary(position_ids, seq_len if seq_len is not None else layout.span)
        # decoding with a cache runs compiled blocks eagerly: every new cache length is a new shape, which
        # would compile the block again (up to the recompile limit) for one token each
        with torch.compiler.set_stance("force_eager") if cache is not None else contextlib.nullcontext():
            for name, layer in self.layers.items():
                layer_cache = cache.layer(name) if cache is not None else None
                h = layer(h, cos, sin, q_scale, layout, layer_cache, position_ids if cache is not None else None)
        if self.args.num_experts:
            losses = [moe.aux_loss for moe in self.moe_blocks() if moe.aux_loss is not None]
            self.moe_aux_loss = torch.stack(losses).sum() if losses else None
        if self.norm is not None:
            h = self.norm(h)
        if self.output is None:
            return h
        if labels is not None:
            return linear_cross_entropy(h, self.output.weight, labels, label_smoothing=label_smoothing)
        return self.output(h)


def copy_whole(whole: torch.Tensor, param: torch.Tensor) -> None:
    """Copy the whole tensor's values into `param`: all of them, or, into a DTensor (a tensor-parallel or
    FSDP shard), the part its rank holds, cut locally (no communication; the whole tensor passes through
    the device, one parameter at a time)."""
    if isinstance(param, DTensor):
        mine = distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(mine.to_local())
    else:
        param.copy_(whole)


def materialize(model: Transformer, device: torch.device | str, seed: int, root: Optional[nn.Module] = None) -> None:
    """Allocate a model built on the meta device on `device` and initialise it; when it was sharded on
    meta first, each rank allocates and initialises only its shards. `root`: the module wrapping it
    (FSDP's root must see the move itself)."""
    (root or model).to_empty(device=device)
    model.tie_weights()
    model.init_weights(seed)


def weight_bytes(args: ModelArgs) -> int:
    """Bytes of the parameters and buffers of a model of `args`: its parts without the layers and one
    layer, built on meta and counted (all of a 4,096-layer model takes half a minute to build on meta)."""
    def size(module: nn.Module) -> int:
        tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}  # tied weights once
        return sum(t.numel() * t.element_size() for t in tensors.values())

    with torch.device("meta"):
        moe = sum(args.is_moe_layer(i) for i in range(args.num_layers))
        dense = args.num_layers - moe
        return (size(Transformer(replace(args, num_layers=0)))
                + (dense and dense * size(Block(replace(args, num_experts=0))))
                + (moe and moe * size(Block(replace(args, first_k_dense=0, moe_every=1)))))


def build_model(args: ModelArgs, device: torch.device | str = "cpu", seed: int = 0) -> Transformer:
    """Construct on the meta device (no memory touched), then materialise and init on `device`; with
    device "meta" the model stays there, to be sharded first and materialised after
    (`spindle.parallel.parallelize.apply_data_and_context_parallel`). Every model a command builds
    whole from a file's config (generate, eval, convert, `spindle.load_model`) passes here: sizes that
    cannot fit on `device` are refused before anything is allocated."""
    if torch.device(device).type != "meta":
        refuse_unless_fits({"weights": weight_bytes(args)}, device, f"a model of {args.num_layers:,} "
                           f"layers, hidden size {args.hidden_size:,} and vocabulary {args.vocab_size:,}")
    with torch.device("meta"):
        model = Transformer(args)
    if torch.device(device).type != "meta":
        materialize(model, device, seed)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
