"""L: gated linear attention with a data-dependent decay, a per-head output norm and an output gate.

    S_t = exp(g_t) S_{t-1} + k_t^T v_t,   o_t = scale * q_t S_t,   g_t = logsigmoid(x_t w_g) / gate_temp
    out = W_o (RMSNorm_head(o) * swish(x W_og))

No RoPE: the decay orders tokens. Keys and values may have fewer heads than queries (GQA), so a
dense layer's projections can be taken over as they are.
"""

import torch.nn.functional as F
from torch import nn

from longctx.config import ModelConfig
from longctx.kernels import gated_linear_attn
from longctx.model.layers import Core
from longctx.model.mixers import register_mixer


class LinearCore(Core):
    """Chunked gated linear attention over the whole sequence, starting from a zero state (and again
    at every document start when the layout carries documents)."""

    letter = "L"

    def forward(self, q, k, v, g, layout):
        self.check_full(layout)
        cu_seqlens = None if layout.docs is None else layout.docs.on(q.device)
        o, _ = gated_linear_attn(q, k, v, g, cu_seqlens=cu_seqlens)
        return o


@register_mixer("L")
class GatedLinearAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.gate_temp = cfg.linear.gate_temp
        inner = self.n_heads * self.head_dim
        self.wq = nn.Linear(cfg.dim, inner, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.w_g = nn.Linear(cfg.dim, self.n_heads)
        self.w_og = nn.Linear(cfg.dim, inner, bias=False)
        self.o_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps)
        self.wo = nn.Linear(inner, cfg.dim, bias=False)
        self.core = LinearCore()

    def forward(self, x, cos, sin, layout):
        b, t, _ = x.shape
        groups = self.n_heads // self.n_kv_heads
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).repeat_interleave(groups, dim=2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).repeat_interleave(groups, dim=2)
        g = F.logsigmoid(self.w_g(x).float()) / self.gate_temp  # [B, T, H]
        o = self.core(q, k, v, g, layout)
        o = self.o_norm(o) * F.silu(self.w_og(x)).view(b, t, self.n_heads, self.head_dim)
        return self.wo(o.flatten(2))

    def extra_repr(self) -> str:
        return f"gate_temp={self.gate_temp}"
