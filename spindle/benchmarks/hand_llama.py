"""The benchmark's baseline: a minimal hand-written Llama in plain PyTorch (fused qkv Linear, SDPA
is_causal, RMSNorm, SwiGLU, rotate-half RoPE with precomputed cos/sin), and the copy of a Spindle
model's weights into it, so both start from the same numbers (`spindle bench train`, variant `hand`)."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class HandRMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def hand_rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class HandBlock(nn.Module):
    def __init__(self, d, heads, ffn, eps):
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.n1, self.n2 = HandRMSNorm(d, eps), HandRMSNorm(d, eps)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.w1 = nn.Linear(d, ffn, bias=False)
        self.w3 = nn.Linear(d, ffn, bias=False)
        self.w2 = nn.Linear(ffn, d, bias=False)

    def forward(self, x, cos, sin):
        b, s, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, s, 3, self.heads, self.hd).transpose(1, 3).unbind(2)
        q = q * cos + hand_rotate_half(q) * sin
        k = k * cos + hand_rotate_half(k) * sin
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, d))
        h = self.n2(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class HandLlama(nn.Module):
    def __init__(self, d, layers, heads, ffn, vocab, seq, eps=1e-5, base=10000.0):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(HandBlock(d, heads, ffn, eps) for _ in range(layers))
        self.norm = HandRMSNorm(d, eps)
        self.head = nn.Linear(d, vocab, bias=False)
        hd = d // heads
        inv = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        ang = torch.arange(seq, dtype=torch.float64)[:, None] * inv
        ang = torch.cat((ang, ang), -1)
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)

    def forward(self, ids):
        x = self.emb(ids)
        for blk in self.blocks:
            x = blk(x, self.cos, self.sin)
        return self.head(self.norm(x))


def load_hand_from_spindle(hand: HandLlama, sp: nn.Module) -> None:
    with torch.no_grad():
        hand.emb.weight.copy_(sp.tok_embeddings.weight)
        hand.norm.weight.copy_(sp.norm.weight)
        hand.head.weight.copy_(sp.output.weight)
        for blk, (_, lay) in zip(hand.blocks, sp.layers.items()):
            a, f = lay.attention, lay.feed_forward
            blk.qkv.weight.copy_(torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]))
            blk.o.weight.copy_(a.wo.weight)
            blk.w1.weight.copy_(f.w1.weight)
            blk.w3.weight.copy_(f.w3.weight)
            blk.w2.weight.copy_(f.w2.weight)
            blk.n1.weight.copy_(lay.attention_norm.weight)
            blk.n2.weight.copy_(lay.ffn_norm.weight)
