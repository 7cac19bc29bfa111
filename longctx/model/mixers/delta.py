"""G: Gated DeltaNet, delta-rule linear attention with a Mamba-2 style decay.

    q, k, v = SiLU(causal depthwise conv, width 4, of x W_q, x W_k, x W_v);  q, k L2-normalised per head
    beta = sigmoid(x W_b),   g = -softplus(x W_a + dt_bias) exp(A_log)              # [B, T, H]
    S_t = exp(g_t) S_{t-1};  u_t = beta_t (v_t - S_t^T k_t);  S_t += k_t u_t^T;  o_t = scale S_t^T q_t
    out = W_o (RMSNorm_head(o) * SiLU(x W_og))

Heads: like the L layer, queries have `n_heads` heads and keys and values `n_kv_heads`, each key/value
head shared by `n_heads / n_kv_heads` query heads (GQA), so a dense layer's q/k/v/o projections are
taken over as they are (`longctx.hf`); the state is per query head. No RoPE: the decay and the
convolution order tokens.

Decoding: `prefill(x)` runs the chunked op and returns the cache (the last 3 pre-convolution inputs
and the state); `step(x_t, cache)` advances one token.

Documents (a layout with `docs`): the state and the convolution window reset at every document start,
so a packed row equals its documents run one by one: the op drops the state entering a start token
(`cu_seqlens`), and the convolution's tap `j` tokens back reads zero unless that token is in the same
document (`since_start >= j`).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from longctx.config import ModelConfig
from longctx.kernels import gated_delta_rule, gated_delta_rule_step
from longctx.model.layers import Core
from longctx.model.mixers import register_mixer

CONV_WIDTH = 4
# The initial per-step decay rate dt * A spans these, from the first head to the last: memories of
# about a thousand tokens down to about one.
DT_RANGE = (1e-3, 1e-1)
A_RANGE = (1.0, 16.0)


def _decay_init(n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A_log, dt_bias)` `[H]`: A and dt spaced over A_RANGE and DT_RANGE (dt geometrically)."""
    a = torch.linspace(*A_RANGE, n_heads)
    dt = torch.exp(torch.linspace(math.log(DT_RANGE[0]), math.log(DT_RANGE[1]), n_heads))
    # softplus(dt_bias) = dt.
    return torch.log(a), dt + torch.log(-torch.expm1(-dt))


def causal_conv(
    x: torch.Tensor, weight: torch.Tensor, halo: torch.Tensor | None, since_start: torch.Tensor | None = None
) -> torch.Tensor:
    """Depthwise causal convolution. x `[B, T, C]`, weight `[C, 1, W]` (the last tap on the current
    token), halo `[B, W - 1, C]`: the inputs before the first token (None: zeros). since_start `[B, T]`
    (or None: one document): how many tokens each token is past its document's start; the tap `j`
    tokens back is used only where `since_start >= j`, so the window restarts at each document."""
    width = weight.shape[-1]
    if halo is None:
        halo = x.new_zeros(x.shape[0], width - 1, x.shape[2])
    padded = torch.cat([halo.to(x.dtype), x], dim=1)  # [B, W - 1 + T, C]
    if since_start is None:
        return F.conv1d(padded.transpose(1, 2), weight.to(x.dtype), groups=x.shape[2]).transpose(1, 2)
    t, w = x.shape[1], weight.to(x.dtype)[:, 0]  # [C, W]
    out = x * w[:, width - 1]
    for j in range(1, width):
        keep = (since_start >= j).to(x.dtype)[..., None]  # [B, T, 1]
        out = out + padded[:, width - 1 - j : width - 1 - j + t] * w[:, width - 1 - j] * keep
    return out


def since_document_start(layout, offset: int, length: int, device) -> torch.Tensor | None:
    """`[B, length]` tokens since the document start for global positions `[offset, offset + length)`
    of a layout with documents (None without)."""
    if layout.docs is None:
        return None
    positions = torch.arange(offset, offset + length, device=device)
    return positions[None] - layout.docs.start_of(positions).to(torch.int64)


class GatedDeltaCore(Core):
    """The short convolution and the gated delta rule over the whole sequence from a zero state."""

    letter = "G"

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim

    def prepare(self, qkv, conv_weight, halo, since_start=None):
        """Convolution (with `halo` before the first token, restarting at document starts when
        `since_start` is given, see `causal_conv`), SiLU, L2 norm of q and k, GQA repeat.
        qkv `[B, T, C]` pre-convolution projections -> q, k, v `[B, T, H, D]`."""
        b, t, _ = qkv.shape
        d, groups = self.head_dim, self.n_heads // self.n_kv_heads
        x = F.silu(causal_conv(qkv, conv_weight, halo, since_start))
        q, k, v = x.split([self.n_heads * d, self.n_kv_heads * d, self.n_kv_heads * d], dim=-1)
        q = F.normalize(q.view(b, t, self.n_heads, d), dim=-1)
        k = F.normalize(k.view(b, t, self.n_kv_heads, d), dim=-1).repeat_interleave(groups, dim=2)
        v = v.view(b, t, self.n_kv_heads, d).repeat_interleave(groups, dim=2)
        return q, k, v

    def forward(self, qkv, g, beta, conv_weight, layout):
        self.check_full(layout)
        since_start = since_document_start(layout, 0, qkv.shape[1], qkv.device)
        cu_seqlens = None if layout.docs is None else layout.docs.on(qkv.device)
        q, k, v = self.prepare(qkv, conv_weight, None, since_start)
        o, _ = gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu_seqlens)
        return o


@register_mixer("G")
class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        inner = self.n_heads * self.head_dim
        kv_inner = self.n_kv_heads * self.head_dim
        self.wq = nn.Linear(cfg.dim, inner, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, kv_inner, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, kv_inner, bias=cfg.qkv_bias)
        self.q_conv = nn.Conv1d(inner, inner, CONV_WIDTH, groups=inner, bias=False)
        self.k_conv = nn.Conv1d(kv_inner, kv_inner, CONV_WIDTH, groups=kv_inner, bias=False)
        self.v_conv = nn.Conv1d(kv_inner, kv_inner, CONV_WIDTH, groups=kv_inner, bias=False)
        self.w_b = nn.Linear(cfg.dim, self.n_heads)
        self.w_a = nn.Linear(cfg.dim, self.n_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.w_og = nn.Linear(cfg.dim, inner, bias=False)
        self.o_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps)
        self.wo = nn.Linear(inner, cfg.dim, bias=False)
        self.core = GatedDeltaCore(self.n_heads, self.n_kv_heads, self.head_dim)
        self.init_delta_parameters()

    def init_rules(self) -> dict:
        """Each own parameter's start for `Transformer.init_weights` (the linear layers are its own
        business): the decay spans of `init_delta_parameters`, PyTorch's default convolution init."""
        h, width = self.n_heads, CONV_WIDTH
        a_log, dt_bias = _decay_init(h)
        # nn.Conv1d's default (kaiming uniform, a=sqrt(5)) for a depthwise filter: bound 1/sqrt(width).
        conv = ("uniform", width**-0.5)
        return {
            "A_log": ("fn", lambda shape: a_log),
            "dt_bias": ("fn", lambda shape: dt_bias),
            "q_conv.weight": conv,
            "k_conv.weight": conv,
            "v_conv.weight": conv,
        }

    @torch.no_grad()
    def init_delta_parameters(self) -> None:
        """Decay and convolution init (the linear layers are the model's `init_weights`' business).

        Head h gets `A` and `dt` spaced from the low to the high end of A_RANGE and DT_RANGE
        (geometric for dt), as Mamba-2 draws them at random: every layer then holds decays from
        ~exp(-1e-3) per token (long memory) to ~exp(-1.6) (a few tokens)."""
        a_log, dt_bias = _decay_init(self.n_heads)
        self.A_log.copy_(a_log)
        self.dt_bias.copy_(dt_bias)
        for conv in (self.q_conv, self.k_conv, self.v_conv):
            conv.reset_parameters()

    def conv_weight(self) -> torch.Tensor:
        return torch.cat([self.q_conv.weight, self.k_conv.weight, self.v_conv.weight])  # [C, 1, W]

    def gates(self, x):
        """`(qkv [.., C], g [.., H], beta [.., H])` for tokens x `[.., dim]`; g and beta in fp32 (fp64
        for fp64 x)."""
        qkv = torch.cat([self.wq(x), self.wk(x), self.wv(x)], dim=-1)
        work = torch.promote_types(x.dtype, torch.float32)
        g = -F.softplus(self.w_a(x).to(work) + self.dt_bias.to(work)) * torch.exp(self.A_log.to(work))
        return qkv, g, torch.sigmoid(self.w_b(x).to(work))

    def out(self, o, x):
        gate = F.silu(self.w_og(x)).view(*o.shape)
        return self.wo((self.o_norm(o) * gate).flatten(-2))

    def forward(self, x, cos, sin, layout):
        qkv, g, beta = self.gates(x)
        return self.out(self.core(qkv, g, beta, self.conv_weight(), layout), x)

    def prefill(self, x, layout=None):
        """Single-process forward over x `[B, T, dim]` that also returns the decoding cache. With a
        layout carrying documents, each document restarts the state and the window; the cache then
        holds the last document's (its window zero before that document's start)."""
        qkv, g, beta = self.gates(x)
        since_start = cu_seqlens = None
        if layout is not None and layout.docs is not None:
            since_start = since_document_start(layout, 0, x.shape[1], x.device)
            cu_seqlens = layout.docs.on(x.device)
        q, k, v = self.core.prepare(qkv, self.conv_weight(), None, since_start)
        o, state = gated_delta_rule(q, k, v, g, beta, output_final_state=True, cu_seqlens=cu_seqlens)
        window = F.pad(qkv, (0, 0, CONV_WIDTH - 1, 0))[:, -(CONV_WIDTH - 1) :]
        if since_start is not None:
            # Window slot i holds token T - 3 + i: kept if it is in the last token's document.
            back = torch.arange(CONV_WIDTH - 2, -1, -1, device=x.device)  # tokens before the last
            window = window * (since_start[:, -1:] >= back[None]).to(window.dtype)[..., None]
        return self.out(o, x), (window, state)

    def step(self, x_t, cache=None, reset=None):
        """One token x_t `[B, dim]` -> `(y_t [B, dim], cache)`; cache is `(window [B, 3, C], state
        [B, H, Dk, Dv] fp32)` or None before the first token. reset `[B]` bool (or None): the rows
        whose token starts a new document; their window and state are dropped before it."""
        qkv, g, beta = self.gates(x_t)
        window, state = cache if cache is not None else (None, None)
        if window is None:
            window = qkv.new_zeros(qkv.shape[0], CONV_WIDTH - 1, qkv.shape[1])
        if reset is not None:
            window = torch.where(reset.to(window.device)[:, None, None], 0.0, window)
        q, k, v = self.core.prepare(qkv[:, None], self.conv_weight(), window)
        o_t, state = gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g, beta, state, reset=reset)
        window = torch.cat([window[:, 1:], qkv[:, None]], dim=1)
        return self.out(o_t, x_t), (window, state)
