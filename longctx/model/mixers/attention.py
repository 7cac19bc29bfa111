"""Softmax-attention mixers: D (dense causal) and S (S2 strided head-sharded sparse).

Both project to GQA queries, keys and values, rotate queries and keys by RoPE at their global
positions, and hand them to a core that computes the attention itself.
"""

import torch
from torch import nn

from longctx.config import ModelConfig, S2Config
from longctx.kernels import flash_attn, s2_attn
from longctx.model.layers import Core
from longctx.model.mixers import register_mixer
from longctx.model.rope import apply_rope


class AttentionProjections(nn.Module):
    """Query/key/value/output projections with GQA and RoPE; the base of D, S and N mixers."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class DenseCore(Core):
    """Causal softmax attention over the whole sequence (optionally windowed)."""

    letter = "D"

    def __init__(self, window: int | None = None):
        super().__init__()
        self.window = window

    def forward(self, q, k, v, layout):
        self.check_full(layout)
        cu_seqlens = None if layout.docs is None else layout.docs.on(q.device)
        return flash_attn(q, k, v, causal=True, window=self.window, cu_seqlens=cu_seqlens)


class S2Core(Core):
    """S2 block-sparse causal attention over the whole sequence."""

    letter = "S"

    def __init__(self, cfg: S2Config):
        super().__init__()
        self.cfg = cfg

    def forward(self, q, k, v, layout):
        self.check_full(layout)
        c = self.cfg
        cu_seqlens = None if layout.docs is None else layout.docs.on(q.device)
        return s2_attn(
            q, k, v, c.block_size, c.local_blocks, c.vert_stride, c.dense_heads, cu_seqlens=cu_seqlens
        )


@register_mixer("D")
class DenseAttention(AttentionProjections):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.core = DenseCore(cfg.dense_window)

    def forward(self, x, cos, sin, layout):
        q, k, v = self.qkv(x, cos, sin)
        return self.wo(self.core(q, k, v, layout).flatten(2))


@register_mixer("S")
class S2Attention(AttentionProjections):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.core = S2Core(cfg.s2)

    def forward(self, x, cos, sin, layout):
        q, k, v = self.qkv(x, cos, sin)
        return self.wo(self.core(q, k, v, layout).flatten(2))
