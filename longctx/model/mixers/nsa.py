"""N: native sparse attention, three branches over the same queries mixed by per-head gates.

    o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win,   gates = sigmoid(x W_g)

compression attends learned block summaries of keys/values; selection attends the raw key blocks
that the compression branch found most important (shared within a kv group); window attends the
last `window` tokens. The block choice is not differentiable (the compression branch learns through
its own output); everything else is, including the compressors' MLPs.

Each op runs its Triton kernel on CUDA and its PyTorch reference on CPU (`longctx.kernels.backend`
forces one). `NSACore` is the part context parallelism replaces: it sees whole-sequence q, k, v.
"""

import torch
from torch import nn

from longctx.config import ModelConfig, NSAConfig
from longctx.kernels import flash_attn, nsa_cmp_attn, nsa_compress, nsa_select_attn, nsa_select_blocks
from longctx.model.layers import Core
from longctx.model.mixers import register_mixer
from longctx.model.mixers.attention import AttentionProjections


class BlockCompressor(nn.Module):
    """Maps each `cmp_block`-token window (every `cmp_stride` tokens) of keys or values to one token:
    the window's mean plus a learned MLP of the window with an intra-block position embedding."""

    def __init__(self, head_dim: int, cmp_block: int, cmp_stride: int):
        super().__init__()
        self.cmp_block, self.cmp_stride = cmp_block, cmp_stride
        hidden = 4 * head_dim
        self.pos_emb = nn.Parameter(torch.empty(cmp_block, head_dim))
        self.w1 = nn.Parameter(torch.empty(hidden, cmp_block * head_dim))
        self.w2 = nn.Parameter(torch.empty(head_dim, hidden))

    def init_weights(self, std: float) -> None:
        for name, (_, value) in self.init_rules(std).items():
            nn.init.normal_(getattr(self, name), std=value)

    def init_rules(self, std: float) -> dict[str, tuple[str, float]]:
        """Each parameter's start (`Transformer.init_weights` draws them per parameter)."""
        return {"pos_emb": ("normal", std), "w1": ("normal", self.w1.shape[1] ** -0.5), "w2": ("normal", std)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nsa_compress(x, self.pos_emb, self.w1, self.w2, self.cmp_block, self.cmp_stride)


class NSACore(Core):
    """The three NSA branches over a whole sequence."""

    letter = "N"

    def __init__(self, cfg: NSAConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, q, k, v, gates, compress_k, compress_v, layout):
        self.check_full(layout)
        c = self.cfg
        cu = None if layout.docs is None else layout.docs.on(q.device)
        k_cmp, v_cmp = compress_k(k), compress_v(v)
        o_cmp, lse_cmp = nsa_cmp_attn(
            q, k_cmp, v_cmp, c.cmp_block, c.cmp_stride, return_lse=True, cu_seqlens=cu
        )
        block_idx = nsa_select_blocks(
            q.detach(), k_cmp.detach(), lse_cmp.detach(), c.cmp_block, c.cmp_stride, c.slc_block, c.slc_top,
            cu_seqlens=cu,
        )  # fmt: skip
        o_slc = nsa_select_attn(q, k, v, block_idx, c.slc_block, cu_seqlens=cu)
        o_win = flash_attn(q, k, v, causal=True, window=c.window, cu_seqlens=cu)
        return mix_branches(gates, o_cmp, o_slc, o_win)


def mix_branches(gates, o_cmp, o_slc, o_win):
    """`gates` `[B, T, H, 3]` in (0, 1) weigh the three `[B, T, H, D]` branch outputs."""
    g = gates.to(o_cmp.dtype).unsqueeze(-1)
    return g[..., 0, :] * o_cmp + g[..., 1, :] * o_slc + g[..., 2, :] * o_win


@register_mixer("N")
class NativeSparseAttention(AttentionProjections):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        c = cfg.nsa
        self.gate = nn.Linear(cfg.dim, 3 * self.n_heads)
        self.compress_k = BlockCompressor(self.head_dim, c.cmp_block, c.cmp_stride)
        self.compress_v = BlockCompressor(self.head_dim, c.cmp_block, c.cmp_stride)
        self.core = NSACore(c)

    def forward(self, x, cos, sin, layout):
        q, k, v = self.qkv(x, cos, sin)
        gates = torch.sigmoid(self.gate(x)).view(*x.shape[:2], self.n_heads, 3)
        o = self.core(q, k, v, gates, self.compress_k, self.compress_v, layout)
        return self.wo(o.flatten(2))
