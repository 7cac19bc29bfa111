"""Chunked gated delta rule in Triton: the forward kernel and the backward kernels.

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
head's chunks in order carrying the `[Dk, BV]` fp32 state, held as up to four `[BK, BV]` blocks: the
one sequential pass. `K K^T`, `Q K^T`, `W H` and `Q H` are summed over Dk tiles, so q, k and W are
never live as whole `[BT, Dk]` tiles next to the state (at Dk 128 that spilled). The quadratic
intra-chunk work is repeated per Dv tile.

Backward (two kernels, fp32 accumulation, no atomics). The forward also stores the state entering
each chunk (`[B, H, NT, Dk, Dv]`) and `U` (`[B, T, H, Dv]`), fp32. With `M = (Q K^T) * D` and `dH'`
the gradient of the state leaving a chunk:

    dU = scale M^T dO + (K * exp(b_last - b)) dH'
    dH = scale (diag(exp b) Q)^T dO + exp(b_last) dH' - W^T dU

- `chunk_gated_delta_bwd_dh_kernel`, grid `[NV, B * H]`: the reverse sequential pass. Each program
  walks its head's chunks from the last, carrying `dH` (`[Dk, BV]`, as up to four `[BK, BV]`
  blocks), rebuilds the chunk's `T` and `W` one Dk tile at a time, stores `dH'` and `dU` per chunk
  and finally the initial state's gradient.
- `chunk_gated_delta_bwd_kernel`, grid `[NT, B * H]`: chunks are independent given `H`, `dH'`, `U`
  and `dU`. Dk and Dv are both tiled (`BK`, `BV` <= 64): it sums `K K^T`, `Q K^T` over Dk tiles and
  rebuilds `T`; over Dv tiles it stores dV and sums dA, `dO U^T`; over Dk tiles (each looping over
  Dv) it forms `W`, `dW = -dU H^T`, `dO H^T`, `U dH'^T`, stores dQ and a partial dK (fp32), and
  finally adds dK's `dA` term. The triangular solves' gradients are `dR = T^T dX`, `dA = -dR X^T`
  (strictly lower). `dg` is the reverse cumulative sum of d b within the chunk (`b_last` is the
  chunk's last row, padding included, where `g = 0`).

Document masking (a state reset at each document start) is not implemented yet (issue #21 builds the
boundaries); in this form it is a per-token reset flag that zeroes `H` entering the token and the
decay mask `D` and `A` across the boundary, both inside the chunk loop.
"""

import math

import torch
import triton
import triton.language as tl

from longctx.kernels.common.backend import interpreting
from longctx.kernels.common.triton import dot_precision, head_dim_tile, strided_tile

# Tiles. Small ones under the interpreter make the CPU tests cover the loops over several Dk and Dv
# tiles. On the GPU (Dk = Dv = 128, bf16, 8 warps, 1 stage; `python -m longctx.kernels.aot --families
# delta`) the two sequential passes carry the state as [64, 32] fp32 blocks (Dv tiles of 32: the
# reverse pass spills 32 B on sm_80 with 64), and the per-chunk backward, which keeps a dozen
# [BT, BK] / [BT, BT] tiles and their dot operands live, takes Dv tiles of 16: with 32 it spills 56 B
# on sm_90, with 64 16 B on sm_80 (and more at 4 warps). docs/kernels.md has the whole matrix.
_BV = 16 if interpreting() else 32
_BV_CHUNK = 16
# The chunk (BT) the Triton path takes when none is asked for. Next to their [BT, Dk] tiles the kernels
# hold several [BT, BT] fp32 tiles (A, T, the decay mask, Q K^T) and build T row by row. Spills per thread
# measured by `python -m longctx.kernels.aot` (sm_90, bf16, Dk = Dv = 128, 8 warps, 1 stage; forward /
# reverse state pass / per-chunk backward) before the forward tiled Dk: BT 64: 1616 / 728 / 1280 B,
# BT 32: 712 / 0 / 416 B, BT 16: 56 / 0 / 0 B. docs/gated-deltanet.md has the table.
DEFAULT_CHUNK = 16
# Dk tile of all three kernels (the two sequential passes hold the state as up to four such blocks),
# small under the interpreter for the same reason.
_BK = 16 if interpreting() else 64
MAX_HEAD_DIM_K = 256
# Warps and pipeline stages of the three kernels (no autotuning: one config each, checked by
# `python -m longctx.kernels.aot --families delta`).
_WARPS, _STAGES = 8, 1


@triton.jit
def _ut_transform(b_A, n_valid, BT: tl.constexpr):
    """`(I + A)^-1` for strictly lower-triangular `A` [BT, BT], by forward substitution over the
    first `n_valid` rows (rows past them have `A = 0` and stay identity rows)."""
    o_i = tl.arange(0, BT)
    b_T = tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0)
    for i in range(1, tl.minimum(BT, n_valid)):
        b_a = tl.sum(tl.where(o_i[:, None] == i, b_A, 0.0), axis=0)  # row i of A
        b_row = tl.where(o_i == i, 1.0, 0.0) - tl.sum(b_a[:, None] * b_T, axis=0)
        b_T = tl.where(o_i[:, None] == i, b_row[None, :], b_T)
    return b_T


@triton.jit
def _load_bk(x, o_k, i_t, i_k, T, H, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """Rows of chunk i_t, Dk tile i_k of a `[B, T, H, K]` tensor, in fp32 (zero outside)."""
    p, m = strided_tile(x + o_k, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
    return tl.load(p, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _store_block(base, b_x, i_k, i_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    p, m = strided_tile(base, i_k * BK, i_v * BV, K, V, V, 1, BK, BV)
    tl.store(p, b_x, mask=m)


@triton.jit
def _load_block(base, i_k, i_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    p, m = strided_tile(base, i_k * BK, i_v * BV, K, V, V, 1, BK, BV)
    return tl.load(p, mask=m, other=0.0)


@triton.jit
def _du_block(b_dh, k, o_k, i_t, i_k, T, H, b_to_end, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
              PRECISION: tl.constexpr):  # fmt: skip
    """(K exp(b_last - b)) dH' restricted to Dk tile i_k."""
    b_k = _load_bk(k, o_k, i_t, i_k, T, H, K, BT, BK)
    return tl.dot(b_k * b_to_end[:, None], b_dh, input_precision=PRECISION)


@triton.jit
def _dh_block(b_dh, q, k, o_k, i_t, i_k, T, H, b_T, b_beta, b_eb, b_el, b_do, b_du, scale,
              K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """Dk tile i_k of dH = scale (diag(exp b) Q)^T dO + exp(b_last) dH' - W^T dU."""
    b_q = _load_bk(q, o_k, i_t, i_k, T, H, K, BT, BK)
    b_k = _load_bk(k, o_k, i_t, i_k, T, H, K, BT, BK)
    b_w = tl.dot(b_T, (b_beta * b_eb)[:, None] * b_k, input_precision=PRECISION)
    b_dh = b_dh * b_el + scale * tl.dot(tl.trans(b_q * b_eb[:, None]), b_do, input_precision=PRECISION)
    return b_dh - tl.dot(tl.trans(b_w), b_du, input_precision=PRECISION)


@triton.jit
def _fwd_block_terms(b_h, q, k, o_k, i_t, i_k, T, H, b_T, b_kw, K: tl.constexpr, BT: tl.constexpr,
                     BK: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """Dk tile i_k's share of `W H` and `Q H` (`b_kw = beta exp(b)`, W = T diag(b_kw) K)."""
    b_q = _load_bk(q, o_k, i_t, i_k, T, H, K, BT, BK)
    b_k = _load_bk(k, o_k, i_t, i_k, T, H, K, BT, BK)
    b_w = tl.dot(b_T, b_kw[:, None] * b_k, input_precision=PRECISION)
    return tl.dot(b_w, b_h, input_precision=PRECISION), tl.dot(b_q, b_h, input_precision=PRECISION)


@triton.jit
def _fwd_block_next(b_h, k, o_k, i_t, i_k, T, H, b_el, b_to_end, b_u, K: tl.constexpr, BT: tl.constexpr,
                    BK: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """Dk tile i_k of H_next = exp(b_last) H + (K exp(b_last - b))^T U."""
    b_k = _load_bk(k, o_k, i_t, i_k, T, H, K, BT, BK) * b_to_end[:, None]
    return b_h * b_el + tl.dot(tl.trans(b_k), b_u, input_precision=PRECISION)


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
    hs,
    us,
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
    STORE_STATES: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The forward's sequential pass: grid `[NV, B * H]`, each program walks its head's chunks in
    order carrying the state (`[Dk, BV]` fp32, held as up to four `[BK, BV]` blocks, `Dk <= 4 BK`).
    q and k are loaded one `[BT, BK]` tile at a time: first for `K K^T` and `Q K^T`, then for each
    block's share of `W H` and `Q H`, then for the block's update, so no `[BT, Dk]` tile is live next
    to the whole state."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = (i_b.to(tl.int64) * T * H + i_h) * K
    o_v = (i_b.to(tl.int64) * T * H + i_h) * V
    o_g = i_b.to(tl.int64) * T * H + i_h
    o_i = tl.arange(0, BT)
    m_strict = o_i[:, None] > o_i[None, :]
    m_incl = o_i[:, None] >= o_i[None, :]
    b_h1 = tl.zeros([BK, BV], dtype=tl.float32)
    b_h2 = tl.zeros([BK, BV], dtype=tl.float32)
    b_h3 = tl.zeros([BK, BV], dtype=tl.float32)
    b_h4 = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        p_h0 = h0 + i_bh.to(tl.int64) * K * V
        b_h1 += _load_block(p_h0, 0, i_v, K, V, BK, BV)
        if K > BK:
            b_h2 += _load_block(p_h0, 1, i_v, K, V, BK, BV)
        if K > 2 * BK:
            b_h3 += _load_block(p_h0, 2, i_v, K, V, BK, BV)
        if K > 3 * BK:
            b_h4 += _load_block(p_h0, 3, i_v, K, V, BK, BV)
    for i_t in range(NT):
        if STORE_STATES:  # the state entering chunk i_t, for the backward
            p_hs = hs + (i_bh.to(tl.int64) * NT + i_t) * K * V
            _store_block(p_hs, b_h1, 0, i_v, K, V, BK, BV)
            if K > BK:
                _store_block(p_hs, b_h2, 1, i_v, K, V, BK, BV)
            if K > 2 * BK:
                _store_block(p_hs, b_h3, 2, i_v, K, V, BK, BV)
            if K > 3 * BK:
                _store_block(p_hs, b_h4, 3, i_v, K, V, BK, BV)
        o_t = i_t * BT + o_i
        m_t = o_t < T
        p_v, m_v = strided_tile(v + o_v, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
        b_v = tl.load(p_v, mask=m_v, other=0.0).to(tl.float32)  # [BT, BV]
        # Padding tokens (past T) have g = 0 and beta = 0: they leave the state unchanged.
        b_beta = tl.load(beta + o_g + o_t * H, mask=m_t, other=0.0)
        b_b = tl.cumsum(tl.load(g + o_g + o_t * H, mask=m_t, other=0.0).to(tl.float64), axis=0)
        b_last = tl.sum(tl.where(o_i == BT - 1, b_b, 0.0), axis=0)
        b_dec = tl.exp(tl.where(m_incl, b_b[:, None] - b_b[None, :], float("-inf")).to(tl.float32))
        b_eb = tl.exp(b_b.to(tl.float32))
        b_to_end = tl.exp((b_last - b_b).to(tl.float32))
        b_el = tl.exp(b_last.to(tl.float32))
        b_kk = tl.zeros([BT, BT], dtype=tl.float32)
        b_qk = tl.zeros([BT, BT], dtype=tl.float32)
        for i_k in range(tl.cdiv(K, BK)):
            b_q = _load_bk(q, o_k, i_t, i_k, T, H, K, BT, BK)
            b_k = _load_bk(k, o_k, i_t, i_k, T, H, K, BT, BK)
            b_kk += tl.dot(b_k, tl.trans(b_k), input_precision=PRECISION)
            b_qk += tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)
        b_T = _ut_transform(tl.where(m_strict, b_beta[:, None] * b_kk * b_dec, 0.0), T - i_t * BT, BT)
        b_kw = b_beta * b_eb
        # U = T diag(beta) V - W H, and Q H, summed over the state's Dk blocks.
        b_u = tl.dot(b_T, b_beta[:, None] * b_v, input_precision=PRECISION)
        b_wh, b_qh = _fwd_block_terms(b_h1, q, k, o_k, i_t, 0, T, H, b_T, b_kw, K, BT, BK, PRECISION)
        b_u -= b_wh
        if K > BK:
            b_wh, b_qh2 = _fwd_block_terms(b_h2, q, k, o_k, i_t, 1, T, H, b_T, b_kw, K, BT, BK, PRECISION)
            b_u -= b_wh
            b_qh += b_qh2
        if K > 2 * BK:
            b_wh, b_qh2 = _fwd_block_terms(b_h3, q, k, o_k, i_t, 2, T, H, b_T, b_kw, K, BT, BK, PRECISION)
            b_u -= b_wh
            b_qh += b_qh2
        if K > 3 * BK:
            b_wh, b_qh2 = _fwd_block_terms(b_h4, q, k, o_k, i_t, 3, T, H, b_T, b_kw, K, BT, BK, PRECISION)
            b_u -= b_wh
            b_qh += b_qh2
        b_o = b_eb[:, None] * b_qh + tl.dot(b_qk * b_dec, b_u, input_precision=PRECISION)
        p_o, m_o = strided_tile(o + o_v, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
        if STORE_STATES:
            p_u, _ = strided_tile(us + o_v, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
            tl.store(p_u, b_u, mask=m_o)
        tl.store(p_o, (b_o * scale).to(p_o.dtype.element_ty), mask=m_o)
        b_h1 = _fwd_block_next(b_h1, k, o_k, i_t, 0, T, H, b_el, b_to_end, b_u, K, BT, BK, PRECISION)
        if K > BK:
            b_h2 = _fwd_block_next(b_h2, k, o_k, i_t, 1, T, H, b_el, b_to_end, b_u, K, BT, BK, PRECISION)
        if K > 2 * BK:
            b_h3 = _fwd_block_next(b_h3, k, o_k, i_t, 2, T, H, b_el, b_to_end, b_u, K, BT, BK, PRECISION)
        if K > 3 * BK:
            b_h4 = _fwd_block_next(b_h4, k, o_k, i_t, 3, T, H, b_el, b_to_end, b_u, K, BT, BK, PRECISION)
    p_ht = ht + i_bh.to(tl.int64) * K * V
    _store_block(p_ht, b_h1, 0, i_v, K, V, BK, BV)
    if K > BK:
        _store_block(p_ht, b_h2, 1, i_v, K, V, BK, BV)
    if K > 2 * BK:
        _store_block(p_ht, b_h3, 2, i_v, K, V, BK, BV)
    if K > 3 * BK:
        _store_block(p_ht, b_h4, 3, i_v, K, V, BK, BV)


@triton.jit
def chunk_gated_delta_bwd_dh_kernel(
    q,
    k,
    g,
    beta,
    do,
    dht,
    dhs,
    dus,
    dh0,
    scale,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_DHT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The reverse state pass: grid `[NV, B * H]`, each program walks its head's chunks from the last,
    carrying `dH` (the gradient of the state leaving the chunk, `[Dk, BV]` fp32, held as up to four
    `[BK, BV]` blocks, `Dk <= 4 BK`), stores it and `dU` per chunk (`dhs`, `dus`) and the gradient
    of the initial state in `dh0`. q, k and W are loaded and formed one `[BT, BK]` tile at a time."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = (i_b.to(tl.int64) * T * H + i_h) * K
    o_v = (i_b.to(tl.int64) * T * H + i_h) * V
    o_g = i_b.to(tl.int64) * T * H + i_h
    o_i = tl.arange(0, BT)
    m_strict = o_i[:, None] > o_i[None, :]
    m_incl = o_i[:, None] >= o_i[None, :]
    b_dh1 = tl.zeros([BK, BV], dtype=tl.float32)
    b_dh2 = tl.zeros([BK, BV], dtype=tl.float32)
    b_dh3 = tl.zeros([BK, BV], dtype=tl.float32)
    b_dh4 = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        p_dht = dht + i_bh.to(tl.int64) * K * V
        b_dh1 += _load_block(p_dht, 0, i_v, K, V, BK, BV)
        if K > BK:
            b_dh2 += _load_block(p_dht, 1, i_v, K, V, BK, BV)
        if K > 2 * BK:
            b_dh3 += _load_block(p_dht, 2, i_v, K, V, BK, BV)
        if K > 3 * BK:
            b_dh4 += _load_block(p_dht, 3, i_v, K, V, BK, BV)
    for j in range(NT):
        i_t = NT - 1 - j
        p_dhs = dhs + (i_bh.to(tl.int64) * NT + i_t) * K * V
        _store_block(p_dhs, b_dh1, 0, i_v, K, V, BK, BV)
        if K > BK:
            _store_block(p_dhs, b_dh2, 1, i_v, K, V, BK, BV)
        if K > 2 * BK:
            _store_block(p_dhs, b_dh3, 2, i_v, K, V, BK, BV)
        if K > 3 * BK:
            _store_block(p_dhs, b_dh4, 3, i_v, K, V, BK, BV)
        o_t = i_t * BT + o_i
        m_t = o_t < T
        p_do, m_do = strided_tile(do + o_v, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
        b_do = tl.load(p_do, mask=m_do, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + o_g + o_t * H, mask=m_t, other=0.0)
        b_b = tl.cumsum(tl.load(g + o_g + o_t * H, mask=m_t, other=0.0).to(tl.float64), axis=0)
        b_last = tl.sum(tl.where(o_i == BT - 1, b_b, 0.0), axis=0)
        b_dec = tl.exp(tl.where(m_incl, b_b[:, None] - b_b[None, :], float("-inf")).to(tl.float32))
        b_eb = tl.exp(b_b.to(tl.float32))
        b_to_end = tl.exp((b_last - b_b).to(tl.float32))
        b_el = tl.exp(b_last.to(tl.float32))
        b_kk = tl.zeros([BT, BT], dtype=tl.float32)
        b_qk = tl.zeros([BT, BT], dtype=tl.float32)
        for i_k in range(tl.cdiv(K, BK)):
            b_q = _load_bk(q, o_k, i_t, i_k, T, H, K, BT, BK)
            b_k = _load_bk(k, o_k, i_t, i_k, T, H, K, BT, BK)
            b_kk += tl.dot(b_k, tl.trans(b_k), input_precision=PRECISION)
            b_qk += tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)
        b_T = _ut_transform(tl.where(m_strict, b_beta[:, None] * b_kk * b_dec, 0.0), T - i_t * BT, BT)
        # dU = scale M^T dO + (K exp(b_last - b)) dH', M = (Q K^T) * D.
        b_du = scale * tl.dot(tl.trans(b_qk * b_dec), b_do, input_precision=PRECISION)
        b_du += _du_block(b_dh1, k, o_k, i_t, 0, T, H, b_to_end, K, BT, BK, PRECISION)
        if K > BK:
            b_du += _du_block(b_dh2, k, o_k, i_t, 1, T, H, b_to_end, K, BT, BK, PRECISION)
        if K > 2 * BK:
            b_du += _du_block(b_dh3, k, o_k, i_t, 2, T, H, b_to_end, K, BT, BK, PRECISION)
        if K > 3 * BK:
            b_du += _du_block(b_dh4, k, o_k, i_t, 3, T, H, b_to_end, K, BT, BK, PRECISION)
        p_du, _ = strided_tile(dus + o_v, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
        tl.store(p_du, b_du, mask=m_do)
        b_dh1 = _dh_block(b_dh1, q, k, o_k, i_t, 0, T, H, b_T, b_beta, b_eb, b_el, b_do, b_du, scale,
                          K, BT, BK, PRECISION)  # fmt: skip
        if K > BK:
            b_dh2 = _dh_block(b_dh2, q, k, o_k, i_t, 1, T, H, b_T, b_beta, b_eb, b_el, b_do, b_du, scale,
                              K, BT, BK, PRECISION)  # fmt: skip
        if K > 2 * BK:
            b_dh3 = _dh_block(b_dh3, q, k, o_k, i_t, 2, T, H, b_T, b_beta, b_eb, b_el, b_do, b_du, scale,
                              K, BT, BK, PRECISION)  # fmt: skip
        if K > 3 * BK:
            b_dh4 = _dh_block(b_dh4, q, k, o_k, i_t, 3, T, H, b_T, b_beta, b_eb, b_el, b_do, b_du, scale,
                              K, BT, BK, PRECISION)  # fmt: skip
    p_dh0 = dh0 + i_bh.to(tl.int64) * K * V
    _store_block(p_dh0, b_dh1, 0, i_v, K, V, BK, BV)
    if K > BK:
        _store_block(p_dh0, b_dh2, 1, i_v, K, V, BK, BV)
    if K > 2 * BK:
        _store_block(p_dh0, b_dh3, 2, i_v, K, V, BK, BV)
    if K > 3 * BK:
        _store_block(p_dh0, b_dh4, 3, i_v, K, V, BK, BV)


@triton.jit
def chunk_gated_delta_bwd_kernel(
    q,
    k,
    v,
    g,
    beta,
    do,
    hs,
    dhs,
    us,
    dus,
    dq,
    dk,
    dv,
    dg,
    dbeta,
    scale,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The per-chunk gradients: grid `[NT, B * H]`, chunks independent given the state entering each
    (`hs`), the gradient of the state leaving it (`dhs`), `U` (`us`, from the forward) and `dU`
    (`dus`, from the reverse pass). Dk and Dv are both tiled (`[BT, BK]`, `[BT, BV]`, `[BK, BV]`
    tiles); the contractions over them are summed in fp32 registers, no atomics. dK is written in
    fp32 in two steps (its `dA` term needs every Dk tile first), by the same program."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = (i_b.to(tl.int64) * T * H + i_h) * K
    o_v = (i_b.to(tl.int64) * T * H + i_h) * V
    o_g = i_b.to(tl.int64) * T * H + i_h
    o_s = (i_bh.to(tl.int64) * NT + i_t) * K * V
    o_i = tl.arange(0, BT)
    o_t = i_t * BT + o_i
    m_t = o_t < T
    m_strict = o_i[:, None] > o_i[None, :]
    m_incl = o_i[:, None] >= o_i[None, :]
    b_beta = tl.load(beta + o_g + o_t * H, mask=m_t, other=0.0)
    b_b = tl.cumsum(tl.load(g + o_g + o_t * H, mask=m_t, other=0.0).to(tl.float64), axis=0)
    b_last = tl.sum(tl.where(o_i == BT - 1, b_b, 0.0), axis=0)
    b_dec = tl.exp(tl.where(m_incl, b_b[:, None] - b_b[None, :], float("-inf")).to(tl.float32))
    b_eb = tl.exp(b_b.to(tl.float32))
    b_to_end = tl.exp((b_last - b_b).to(tl.float32))
    # 1. K K^T and Q K^T over the Dk tiles; T = (I + A)^-1.
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    b_qk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        p_q, m_q = strided_tile(q + o_k, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
        p_k, m_k = strided_tile(k + o_k, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
        b_q = tl.load(p_q, mask=m_q, other=0.0).to(tl.float32)
        b_k = tl.load(p_k, mask=m_k, other=0.0).to(tl.float32)
        b_kk += tl.dot(b_k, tl.trans(b_k), input_precision=PRECISION)
        b_qk += tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)
    b_T = _ut_transform(tl.where(m_strict, b_beta[:, None] * b_kk * b_dec, 0.0), T - i_t * BT, BT)
    # 2. Over the Dv tiles: U0 = T R with R = diag(beta) V, so dR = T^T dU, dA -= dR U0^T; dV; dO U^T.
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_dm = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        p_v, m_v = strided_tile(v + o_v, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
        p_u, _ = strided_tile(us + o_v, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
        p_du, _ = strided_tile(dus + o_v, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
        p_do, _ = strided_tile(do + o_v, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
        b_v = tl.load(p_v, mask=m_v, other=0.0).to(tl.float32)
        b_u = tl.load(p_u, mask=m_v, other=0.0)
        b_du = tl.load(p_du, mask=m_v, other=0.0)
        b_do = tl.load(p_do, mask=m_v, other=0.0).to(tl.float32)
        b_u0 = tl.dot(b_T, b_beta[:, None] * b_v, input_precision=PRECISION)
        b_dr = tl.dot(tl.trans(b_T), b_du, input_precision=PRECISION)
        p_dv, _ = strided_tile(dv + o_v, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
        tl.store(p_dv, (b_beta[:, None] * b_dr).to(p_dv.dtype.element_ty), mask=m_v)
        b_dbeta += tl.sum(b_dr * b_v, axis=1)
        b_dA -= tl.dot(b_dr, tl.trans(b_u0), input_precision=PRECISION)
        b_dm += tl.dot(b_do, tl.trans(b_u), input_precision=PRECISION)
    # O = scale (diag(exp b) Q H + M U), M = (Q K^T) * D.
    b_dm = tl.where(m_incl, b_dm * scale, 0.0)
    b_dmd = b_dm * b_dec
    # 3. Over the Dk tiles (each with a loop over Dv): W = T diag(beta exp(b)) K, dW = -dU H^T;
    #    H_next = exp(b_last) H + (K exp(b_last - b))^T U. dQ is complete here, dK but for its dA term.
    b_srw = tl.zeros([BT], dtype=tl.float32)  # sum(dR_w * K) per row
    b_skd = tl.zeros([BT], dtype=tl.float32)  # sum(dL/d(K exp(b_last - b)) * K) per row
    b_sqh = tl.zeros([BT], dtype=tl.float32)  # sum(Q * dO H^T) per row
    b_dlast = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)  # sum(dH_next * H)
    for i_k in range(tl.cdiv(K, BK)):
        p_q, m_q = strided_tile(q + o_k, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
        p_k, m_k = strided_tile(k + o_k, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
        b_q = tl.load(p_q, mask=m_q, other=0.0).to(tl.float32)
        b_k = tl.load(p_k, mask=m_k, other=0.0).to(tl.float32)
        b_w = tl.dot(b_T, (b_beta * b_eb)[:, None] * b_k, input_precision=PRECISION)
        b_dw = tl.zeros([BT, BK], dtype=tl.float32)
        b_dqh = tl.zeros([BT, BK], dtype=tl.float32)  # dO H^T
        b_dkd = tl.zeros([BT, BK], dtype=tl.float32)  # U dH_next^T
        for i_v in range(tl.cdiv(V, BV)):
            p_h, m_h = strided_tile(hs + o_s, i_k * BK, i_v * BV, K, V, V, 1, BK, BV)
            p_dh, _ = strided_tile(dhs + o_s, i_k * BK, i_v * BV, K, V, V, 1, BK, BV)
            p_u, m_u = strided_tile(us + o_v, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
            p_du, _ = strided_tile(dus + o_v, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
            p_do, _ = strided_tile(do + o_v, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
            b_h = tl.load(p_h, mask=m_h, other=0.0)
            b_dh = tl.load(p_dh, mask=m_h, other=0.0)
            b_u = tl.load(p_u, mask=m_u, other=0.0)
            b_du = tl.load(p_du, mask=m_u, other=0.0)
            b_do = tl.load(p_do, mask=m_u, other=0.0).to(tl.float32)
            b_dw -= tl.dot(b_du, tl.trans(b_h), input_precision=PRECISION)
            b_dqh += tl.dot(b_do, tl.trans(b_h), input_precision=PRECISION)
            b_dkd += tl.dot(b_u, tl.trans(b_dh), input_precision=PRECISION)
            b_dlast += tl.sum(tl.sum(b_dh * b_h, axis=1), axis=0)
        b_drw = tl.dot(tl.trans(b_T), b_dw, input_precision=PRECISION)
        b_dA -= tl.dot(b_drw, tl.trans(b_w), input_precision=PRECISION)
        b_srw += tl.sum(b_drw * b_k, axis=1)
        b_skd += tl.sum(b_dkd * b_k, axis=1)
        b_sqh += tl.sum(b_q * b_dqh, axis=1)
        b_dq = scale * b_eb[:, None] * b_dqh + tl.dot(b_dmd, b_k, input_precision=PRECISION)
        b_dk = (b_beta * b_eb)[:, None] * b_drw + b_to_end[:, None] * b_dkd
        b_dk += tl.dot(tl.trans(b_dmd), b_q, input_precision=PRECISION)
        p_dq, _ = strided_tile(dq + o_k, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
        p_dk, _ = strided_tile(dk + o_k, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
        tl.store(p_dq, b_dq.to(p_dq.dtype.element_ty), mask=m_q)
        tl.store(p_dk, b_dk, mask=m_k)
    # A = beta_t (K K^T) * D, strictly lower.
    b_dA = tl.where(m_strict, b_dA, 0.0)
    b_dkk = b_dA * b_beta[:, None] * b_dec
    b_dbeta += b_srw * b_eb + tl.sum(b_dA * b_dec * b_kk, axis=1)
    # d b: from W's diag(exp b), O's diag(exp b), K exp(b_last - b), b_last, and D = exp(b_t - b_s).
    b_db = b_beta * b_eb * b_srw + scale * b_eb * b_sqh - b_skd * b_to_end
    b_dblast = b_dlast * tl.exp(b_last.to(tl.float32)) + tl.sum(b_skd * b_to_end, axis=0)
    b_db += tl.where(o_i == BT - 1, b_dblast, 0.0)
    b_p = tl.where(m_incl, (b_dm * b_qk + b_dA * b_beta[:, None] * b_kk) * b_dec, 0.0)
    b_db += tl.sum(b_p, axis=1) - tl.sum(b_p, axis=0)
    # b_t = sum_{s <= t} g_s, so dg_s = sum_{t >= s} db_t.
    b_dg = tl.sum(b_db, axis=0) - tl.cumsum(b_db, axis=0) + b_db
    tl.store(dg + o_g + o_t * H, b_dg, mask=m_t)
    tl.store(dbeta + o_g + o_t * H, b_dbeta, mask=m_t)
    # 4. dK's dA term: dK += dKK K + dKK^T K, dKK = dA * beta_t * D (the partial dK was written above).
    tl.debug_barrier()
    for i_k in range(tl.cdiv(K, BK)):
        p_k, m_k = strided_tile(k + o_k, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
        p_dk, _ = strided_tile(dk + o_k, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
        b_k = tl.load(p_k, mask=m_k, other=0.0).to(tl.float32)
        b_dk = tl.load(p_dk, mask=m_k, other=0.0)
        b_dk += tl.dot(b_dkk, b_k, input_precision=PRECISION)
        b_dk += tl.dot(tl.trans(b_dkk), b_k, input_precision=PRECISION)
        tl.store(p_dk, b_dk, mask=m_k)


def _tiles(K, V):
    return head_dim_tile(K), min(_BV, head_dim_tile(V))


def chunk_gated_delta_fwd(q, k, v, g, beta, scale: float, initial_state, chunk_size: int, save_states=False):
    """Launch the forward kernel. q, k `[B, T, H, K]`, v `[B, T, H, V]` (one dtype), g, beta
    `[B, T, H]` fp32, initial_state `[B, H, K, V]` fp32 or None; all contiguous.

    Returns `o [B, T, H, V]` in v's dtype, the final state `[B, H, K, V]` fp32 and, with
    `save_states`, `(the state entering each chunk [B, H, NT, K, V], U [B, T, H, V])` fp32 (else
    None).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, chunk_size)
    BK, BV = _tiles(K, V)
    BK = max(min(BK, _BK), BK // 4)
    o = torch.empty(B, T, H, V, dtype=v.dtype, device=q.device)
    final_state = torch.empty(B, H, K, V, dtype=torch.float32, device=q.device)
    if initial_state is None:
        # The kernel compiled without an initial state spilled 16-48 B on sm_80 at Dk 96 and 128 (the
        # one with it: none, `python -m longctx.kernels.aot --families delta`); a zero state costs
        # one [Dk, BV] load per program.
        initial_state = torch.zeros(B, H, K, V, dtype=torch.float32, device=q.device)
    states = us = None
    if save_states:
        states = torch.empty(B, H, NT, K, V, dtype=torch.float32, device=q.device)
        us = torch.empty(B, T, H, V, dtype=torch.float32, device=q.device)
    chunk_gated_delta_fwd_kernel[(triton.cdiv(V, BV), B * H)](
        q, k, v, g, beta, initial_state, o, final_state, states, us, scale, T, NT, H=H, K=K, V=V,
        BT=chunk_size, BK=BK, BV=BV, USE_H0=initial_state is not None, STORE_STATES=save_states,
        PRECISION=dot_precision(q.dtype), num_warps=_WARPS, num_stages=_STAGES,
    )  # fmt: skip
    return o, final_state, (states, us) if save_states else None


def chunk_gated_delta_bwd(q, k, v, g, beta, states, us, do, dht, scale: float, chunk_size: int):
    """Launch the backward: the reverse state pass, then the per-chunk gradients.

    Returns `dq, dk, dv` (q's dtype), `dg, dbeta` fp32 and the initial state's gradient fp32.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, chunk_size)
    BK, BV = _tiles(K, V)
    precision = dot_precision(q.dtype)
    do = do.to(v.dtype).contiguous()
    if dht is not None:
        dht = dht.float().contiguous()
    dstates = torch.empty(B, H, NT, K, V, dtype=torch.float32, device=q.device)
    dus = torch.empty(B, T, H, V, dtype=torch.float32, device=q.device)
    dh0 = torch.empty(B, H, K, V, dtype=torch.float32, device=q.device)
    chunk_gated_delta_bwd_dh_kernel[(triton.cdiv(V, BV), B * H)](
        q, k, g, beta, do, dht, dstates, dus, dh0, scale, T, NT, H=H, K=K, V=V, BT=chunk_size,
        BK=max(min(BK, _BK), BK // 4), BV=BV, USE_DHT=dht is not None, PRECISION=precision,
        num_warps=_WARPS, num_stages=_STAGES,
    )  # fmt: skip
    dq = torch.empty(*q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(*k.shape, dtype=torch.float32, device=q.device)  # written in two steps, kept fp32
    dv = torch.empty(*v.shape, dtype=v.dtype, device=q.device)
    dg = torch.empty(*g.shape, dtype=torch.float32, device=q.device)
    dbeta = torch.empty(*beta.shape, dtype=torch.float32, device=q.device)
    chunk_gated_delta_bwd_kernel[(NT, B * H)](
        q, k, v, g, beta, do, states, dstates, us, dus, dq, dk, dv, dg, dbeta, scale, T, NT, H=H, K=K,
        V=V, BT=chunk_size, BK=min(BK, _BK), BV=min(BV, _BV_CHUNK), PRECISION=precision, num_warps=_WARPS,
        num_stages=_STAGES,
    )  # fmt: skip
    return dq, dk.to(k.dtype), dv, dg, dbeta, dh0


class ChunkGatedDeltaRuleFunction(torch.autograd.Function):
    """Triton forward (saving the state entering each chunk) and Triton backward."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size):
        # The per-chunk states and U are only kept when a gradient will be asked for.
        o, final_state, saved = chunk_gated_delta_fwd(
            q, k, v, g, beta, scale, initial_state, chunk_size, save_states=any(ctx.needs_input_grad)
        )
        ctx.save_for_backward(q, k, v, g, beta, *(saved or (None, None)))
        ctx.scale, ctx.chunk_size, ctx.has_h0 = scale, chunk_size, initial_state is not None
        return o, (final_state if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, states, us = ctx.saved_tensors
        dq, dk, dv, dg, dbeta, dh0 = chunk_gated_delta_bwd(
            q, k, v, g, beta, states, us, do, dht, ctx.scale, ctx.chunk_size
        )
        return dq, dk, dv, dg, dbeta, None, (dh0 if ctx.has_h0 else None), None, None


def chunk_gated_delta_rule(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, chunk_size=None
):
    """The Triton path of `longctx.kernels.gated_delta_rule` (see there); `chunk_size` is the chunk
    length BT, a power of two from 16 to 64 (None: DEFAULT_CHUNK). Inputs are made contiguous, k and v
    take q's dtype, and g, beta and the initial state are used in fp32."""
    chunk_size = DEFAULT_CHUNK if chunk_size is None else chunk_size
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
