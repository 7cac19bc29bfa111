"""Chunked gated delta rule in Triton: the forward kernel, and a backward that recomputes the chunked
PyTorch form (`naive.gated_delta_chunk_ref`) under autograd.

Use it through `longctx.kernels.gated_delta_rule`, which picks this path on CUDA (or under
`TRITON_INTERPRET=1`); this module is imported lazily, so it is only loaded where Triton runs.

Math (see `naive.gated_delta_chunk_ref`). Per (batch, head) the sequence is cut into chunks of `BT`
tokens. Inside a chunk entered with state `H`, `b_t` is the log-decay summed from the chunk's first
token and `A[t, s] = beta_t exp(b_t - b_s) k_t . k_s` (`s < t`). The product of the chunk's
Householder-like updates is applied in its WY / UT-transform form: `T = (I + A)^-1` (unit lower
triangular, built row by row), `U0 = T diag(beta) V`, `W = T diag(beta exp(b)) K`, and then

    U      = U0 - W H
    O      = scale (diag(exp b) Q H + (Q K^T * D) U),   D[t, s] = exp(b_t - b_s) for s <= t
    H_next = exp(b_last) H + (K * exp(b_last - b))^T U

so everything but the triangular build is a matmul. `b` is summed in fp64 and rounded to fp32 once
differences form (after a strong decay it reaches the -1000s); every exponent is `<= 0`.

Kernel: `chunk_gated_delta_fwd_kernel`, grid `[NV, B * H]` (NV = tiles of Dv). One program walks its
head's chunks in order carrying the `[Dk, BV]` fp32 state: the one sequential pass. Dk is one tile
(at most 256), because `W H` needs the whole key dimension. The quadratic intra-chunk work is
repeated per Dv tile; with Dv <= BV (the usual head dims) there is one tile.

Backward: a full Triton backward is not written yet. `ChunkGatedDeltaRuleFunction.backward`
recomputes the forward with the chunked PyTorch form (matmuls and a batched triangular solve over all
chunks at once, a Python loop over chunks for the state pass) and differentiates it with autograd,
in fp32 whatever the input dtype. It is exact (same math) but slower than a fused kernel on the GPU.

Document masking (a state reset at each document start) is not implemented yet (issue #21 builds the
boundaries); in this form it is a per-token reset flag that zeroes `H` entering the token and the
decay mask `D` and `A` across the boundary, both inside the chunk loop.
"""

import math

import torch
import triton
import triton.language as tl

from longctx.kernels.common.backend import interpreting
from longctx.kernels.gated_delta.naive import gated_delta_chunk_ref

# Outputs are allocated here; tests replace it with a NaN-filling allocator so that a kernel which
# skips a write shows up as NaN.
_empty = torch.empty

# Small Dv tiles under the interpreter make the CPU tests cover the loop over several tiles.
_BV = 16 if interpreting() else 64
MAX_HEAD_DIM_K = 256


@triton.jit
def _tile(base, r0, c0, R, C, stride_r, stride_c, BR: tl.constexpr, BC: tl.constexpr):
    """Pointers and in-bounds mask of the [BR, BC] tile at (r0, c0) of an [R, C] strided matrix."""
    o_r = r0 + tl.arange(0, BR)
    o_c = c0 + tl.arange(0, BC)
    p = base + o_r.to(tl.int64)[:, None] * stride_r + o_c[None, :] * stride_c
    return p, (o_r < R)[:, None] & (o_c < C)[None, :]


@triton.jit
def chunk_gated_delta_fwd_kernel(
    q,
    k,
    v,
    g,
    beta,
    h0,
    o,
    ht,
    scale,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_H0: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = (i_b.to(tl.int64) * T * H + i_h) * K
    o_v = (i_b.to(tl.int64) * T * H + i_h) * V
    o_g = i_b.to(tl.int64) * T * H + i_h
    o_i = tl.arange(0, BT)
    m_strict = o_i[:, None] > o_i[None, :]
    m_incl = o_i[:, None] >= o_i[None, :]
    b_eye = tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0)
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        p_h0, m_h0 = _tile(h0 + i_bh.to(tl.int64) * K * V, 0, i_v * BV, K, V, V, 1, BK, BV)
        b_h += tl.load(p_h0, mask=m_h0, other=0.0)
    for i_t in range(NT):
        o_t = i_t * BT + o_i
        m_t = o_t < T
        p_q, m_q = _tile(q + o_k, i_t * BT, 0, T, K, H * K, 1, BT, BK)
        p_k, m_k = _tile(k + o_k, i_t * BT, 0, T, K, H * K, 1, BT, BK)
        p_v, m_v = _tile(v + o_v, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
        b_q = tl.load(p_q, mask=m_q, other=0.0).to(tl.float32)  # [BT, BK]
        b_k = tl.load(p_k, mask=m_k, other=0.0).to(tl.float32)  # [BT, BK]
        b_v = tl.load(p_v, mask=m_v, other=0.0).to(tl.float32)  # [BT, BV]
        # Padding tokens (past T) have g = 0 and beta = 0: they leave the state unchanged.
        b_beta = tl.load(beta + o_g + o_t * H, mask=m_t, other=0.0)
        b_b = tl.cumsum(tl.load(g + o_g + o_t * H, mask=m_t, other=0.0).to(tl.float64), axis=0)
        b_last = tl.sum(tl.where(o_i == BT - 1, b_b, 0.0), axis=0)
        b_dec = tl.exp(tl.where(m_incl, b_b[:, None] - b_b[None, :], float("-inf")).to(tl.float32))
        b_eb = tl.exp(b_b.to(tl.float32))
        b_to_end = tl.exp((b_last - b_b).to(tl.float32))
        b_A = tl.dot(b_k, tl.trans(b_k), input_precision=PRECISION)
        b_A = tl.where(m_strict, b_beta[:, None] * b_A * b_dec, 0.0)
        # T = (I + A)^-1 by forward substitution: row i = e_i - sum_{s < i} A[i, s] T[s, :]. Rows
        # past T (padding) have A = 0 and stay identity rows.
        b_T = b_eye
        for i in range(1, tl.minimum(BT, T - i_t * BT)):
            b_a = tl.sum(tl.where(o_i[:, None] == i, b_A, 0.0), axis=0)  # row i of A
            b_row = tl.where(o_i == i, 1.0, 0.0) - tl.sum(b_a[:, None] * b_T, axis=0)
            b_T = tl.where(o_i[:, None] == i, b_row[None, :], b_T)
        b_u = tl.dot(b_T, b_beta[:, None] * b_v, input_precision=PRECISION)
        b_w = tl.dot(b_T, (b_beta * b_eb)[:, None] * b_k, input_precision=PRECISION)
        b_u -= tl.dot(b_w, b_h, input_precision=PRECISION)
        b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * b_dec
        b_o = b_eb[:, None] * tl.dot(b_q, b_h, input_precision=PRECISION)
        b_o += tl.dot(b_qk, b_u, input_precision=PRECISION)
        p_o, m_o = _tile(o + o_v, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
        tl.store(p_o, (b_o * scale).to(p_o.dtype.element_ty), mask=m_o)
        b_kd = b_k * b_to_end[:, None]
        b_h = b_h * tl.exp(b_last.to(tl.float32)) + tl.dot(tl.trans(b_kd), b_u, input_precision=PRECISION)
    p_ht, m_ht = _tile(ht + i_bh.to(tl.int64) * K * V, 0, i_v * BV, K, V, V, 1, BK, BV)
    tl.store(p_ht, b_h, mask=m_ht)


def chunk_gated_delta_fwd(q, k, v, g, beta, scale: float, initial_state, chunk_size: int):
    """Launch the forward kernel. q, k `[B, T, H, K]`, v `[B, T, H, V]` (one dtype), g, beta
    `[B, T, H]` fp32, initial_state `[B, H, K, V]` fp32 or None; all contiguous.

    Returns `o [B, T, H, V]` in v's dtype and the final state `[B, H, K, V]` fp32.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, chunk_size)
    BK = max(16, triton.next_power_of_2(K))
    BV = min(_BV, max(16, triton.next_power_of_2(V)))
    o = _empty(B, T, H, V, dtype=v.dtype, device=q.device)
    final_state = _empty(B, H, K, V, dtype=torch.float32, device=q.device)
    chunk_gated_delta_fwd_kernel[(triton.cdiv(V, BV), B * H)](
        q, k, v, g, beta, initial_state, o, final_state, scale, T, NT, H=H, K=K, V=V,
        BT=chunk_size, BK=BK, BV=BV, USE_H0=initial_state is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4,
    )  # fmt: skip
    return o, final_state


class ChunkGatedDeltaRuleFunction(torch.autograd.Function):
    """Triton forward; backward by autograd through the chunked PyTorch form (module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size):
        o, final_state = chunk_gated_delta_fwd(q, k, v, g, beta, scale, initial_state, chunk_size)
        ctx.save_for_backward(q, k, v, g, beta, initial_state)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        return o, (final_state if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, initial_state = ctx.saved_tensors
        inputs = [x.detach().float().requires_grad_() for x in (q, k, v, g, beta)]
        state = None if initial_state is None else initial_state.detach().requires_grad_()
        with torch.enable_grad():
            o, final_state = gated_delta_chunk_ref(
                *inputs, scale=ctx.scale, initial_state=state, output_final_state=True,
                chunk_size=ctx.chunk_size,
            )  # fmt: skip
            loss = (o * do.float()).sum()
            if dht is not None:
                loss = loss + (final_state * dht.float()).sum()
            leaves = inputs + ([state] if state is not None else [])
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        grads = [torch.zeros_like(x) if d is None else d for d, x in zip(grads, leaves)]
        dq, dk, dv, dg, dbeta = (d.to(x.dtype) for d, x in zip(grads[:5], (q, k, v, g, beta)))
        dh0 = grads[5] if state is not None else None
        return dq, dk, dv, dg, dbeta, None, dh0, None, None


def chunk_gated_delta_rule(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, chunk_size=64
):
    """The Triton path of `longctx.kernels.gated_delta_rule` (see there); `chunk_size` is the chunk
    length BT, a power of two from 16 to 64. Inputs are made contiguous, k and v take q's dtype, and
    g, beta and the initial state are used in fp32."""
    if chunk_size not in (16, 32, 64):
        raise ValueError(f"chunk_size must be 16, 32 or 64 (a tl.dot tile), got {chunk_size}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton kernel takes fp16, bf16 or fp32 inputs, got {q.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM_K:
        raise ValueError(
            f"the Triton kernel holds the key dim in one tile: Dk must be <= {MAX_HEAD_DIM_K}, "
            f"got {q.shape[-1]}"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    q = q.contiguous()
    k, v = k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous()
    g, beta = g.float().contiguous(), beta.float().contiguous()
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    return ChunkGatedDeltaRuleFunction.apply(
        q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size
    )
