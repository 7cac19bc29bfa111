"""Chunked gated linear attention in Triton: forward and backward, with state in and state out.

Use it through `longctx.kernels.gated_linear_attn`, which picks this path on CUDA (or under
`TRITON_INTERPRET=1`); this module is imported lazily, so it is only loaded where Triton runs.

Math. Per (batch, head) the sequence is cut into chunks of `BT` tokens. Inside chunk `n` let
`b_t = g_first + ... + g_t` be the log-decay summed from the chunk's first token (so `b_t <= 0`,
decreasing), `B_n` its value at the chunk's last token, and `H_n` the state entering the chunk
(`H_0` = the initial state). Then

    o_t     = scale * ( exp(b_t) q_t H_n  +  sum_{s <= t in chunk} exp(b_t - b_s) (q_t . k_s) v_s )
    H_{n+1} = exp(B_n) H_n  +  sum_{s in chunk} exp(B_n - b_s) k_s^T v_s

Every exponent formed is `b_t - b_s` with `s <= t`, `B_n - b_s`, `b_t` or `B_n`: all `<= 0`, so a
per-token `g` of -20 (or -1000) underflows to exact zeros instead of overflowing. Masked entries get
the exponent `-inf` before `exp`, never a positive number.

Backward. With `dH_n` the gradient of the state entering chunk `n` (`dH_N` = the final state's
gradient), the reverse recurrence is `dH_n = exp(B_n) dH_{n+1} + scale * (q exp(b))^T do` over the
chunk, ending at `dH_0` = d(initial state). Given `dS_n = dH_{n+1}` per chunk:

    dq_t = scale * ( exp(b_t) do_t H_n^T + sum_{s <= t} exp(b_t - b_s) (do_t . v_s) k_s )
    dk_s = exp(B_n - b_s) v_s dS_n^T + scale * sum_{t >= s} exp(b_t - b_s) (do_t . v_s) q_t
    dv_s = exp(B_n - b_s) k_s dS_n   + scale * sum_{t >= s} exp(b_t - b_s) (q_t . k_s) do_t

dg. A pair (query i, key j <= i) carries the decay exp(g_{j+1} + ... + g_i), so dL/dg_t is the sum of
the pair terms `M_ij = scale exp(...) (q_i . k_j)(do_i . v_j)` over the pairs whose span covers t,
`j < t <= i` (the final state counts as a query after the last token, the initial state as a key
before the first). The textbook shortcut `dg = reverse_cumsum(q . dq - k . dk)` gets the same number
by adding every pair at its query and subtracting it at its key, so the diagonal pairs (i = j, the
largest terms, spanning no decay) and every pair after t cancel in floating point: with a strong
decay the true dg is ~exp(-20) while the cancelled terms are ~1, leaving nothing but rounding. This
kernel sums only pairs that span t, sorted by where j and i lie relative to t's chunk n:
    i in the chunk at or after t, j before the chunk:  sum_{u >= t} q_u . dq_inter_u
    i after the chunk, j in the chunk before t:        sum_{s < t}  k_s . dk_inter_s
    i after, j before the chunk (spans it all):        exp(B_n) sum(H_n * dS_n)
    both in the chunk, diagonal left out:              sum_{u >= t} (q_u . dq_intra_u - k_u . dk_intra_u)
The last line still cancels pairs lying after t, but only within one chunk, where a strong decay
also makes those pairs small. dg is thus chunk-local: no pass over the whole sequence.

Precision. `b` is kept in fp64: after a strong decay it reaches the -1000s, where one fp32 step is
1e-4, and `b_t - b_s` would carry that error into every exponential. Differences are rounded to fp32
once formed, so decays are as exact as the fp32 recurrence's `exp(g_t)`.

Kernels (grids in brackets; BH = batch * heads, NT = chunks, NK/NV = tiles of Dk/Dv):
    forward   chunk_local_cumsum [NT, BH]     g -> b, the within-chunk prefix sums (fp64)
              chunk_fwd_h        [NK, NV, BH] the one sequential pass: walks the chunks, stores H_n
              chunk_fwd_o        [NV, NT, BH] inter-chunk q H_n plus the masked intra-chunk product
    backward  chunk_bwd_dh       [NK, NV, BH] reverse walk, stores dS_n, returns d(initial state)
              chunk_bwd_dv       [NV, NT, BH]
              chunk_bwd_dqk      [NK, NT, BH] dq, dk and dg (one partial per K tile)
Everything quadratic (the BT x BT decay-masked products and the q H / k dS products) runs parallel
over chunks; only the two state passes are sequential, and each of their steps is a single
(BK x BT) @ (BT x BV) product. A two-pass alternative (per-chunk local states in parallel, then an
elementwise scan) would write and re-read an fp32 `[NT, Dk, Dv]` buffer twice more per head; the
per-chunk states `H_n` are instead stored once, in the input dtype (bf16 in training, as
flash-linear-attention does), and kept for the backward pass rather than recomputed.
"""

import math

import torch
import triton
import triton.language as tl

from longctx.kernels.common.backend import interpreting
from longctx.kernels.common.triton import dot_precision, head_dim_tile, strided_tile
from longctx.kernels.common.tuning import sm8x, tuned

# Under the interpreter every configuration would be benchmarked in Python, and small tiles make the
# CPU tests cover multi-tile loops with small head dims; on a GPU the autotuner picks.
_TILE = 32 if interpreting() else 64


def _configs(tiles: dict[str, list[int]]) -> list[triton.Config]:
    if interpreting():
        return [triton.Config(dict.fromkeys(tiles, _TILE), num_warps=4, num_stages=1)]
    out = [triton.Config({})]
    for name, sizes in tiles.items():
        out = [triton.Config({**c.kwargs, name: s}) for c in out for s in sizes]
    return [triton.Config(c.kwargs, num_warps=w, num_stages=s) for c in out for w in (4, 8) for s in (2, 3)]


def _leave_out(everywhere=(), on_sm8x=()):
    """A tuner prune (`Tuned.candidates`) that drops the configs found spilling registers by the full
    AOT matrix (`python -m longctx.kernels.aot --families gla`: hd 64/96/128, bf16 and fp16): each
    entry `(tiles, warps, stages)` matches configs with those tiles, and those warps and stages (None:
    any); `on_sm8x` entries only where mma.sync holds the operands in registers (`arch` < 90)."""

    def matches(config, entry):
        tiles, warps, stages = entry
        return (
            all(config.kwargs.get(k) == v for k, v in tiles.items())
            and warps in (None, config.num_warps)
            and stages in (None, config.num_stages)
        )

    def prune(configs, values, arch):
        drop = [*everywhere, *(on_sm8x if sm8x(arch) else ())]
        return [c for c in configs if not any(matches(c, e) for e in drop)]

    return prune


# Found spilling (the AOT matrix at hd <= 128; bytes per thread): fwd_o BK 64 x BV 128 w4 s3 on sm_80
# at hd 96 (8 B); bwd_dh 64 x 64 w4 s3 on sm_80 at hd 128 (16 B); bwd_dv BK 32 x BV 64 w8 s3 on sm_80
# at hd 64 (16 B); bwd_dqk with BV 64 on 4 warps on both arches (32-104 B), on 8 warps too on sm_80 at
# hd 64 (96 B). The first candidate of each (32 x 32, the `LONGCTX_TUNE=off` default) spills nowhere.
_FWD_O_PRUNE = _leave_out(on_sm8x=[({"BK": 64, "BV": 128}, 4, 3)])
_BWD_DH_PRUNE = _leave_out(on_sm8x=[({"BK": 64, "BV": 64}, 4, 3)])
_BWD_DV_PRUNE = _leave_out(on_sm8x=[({"BK": 32, "BV": 64}, 8, 3)])
_BWD_DQK_PRUNE = _leave_out(everywhere=[({"BV": 64}, 4, None)], on_sm8x=[({"BV": 64}, None, None)])


@triton.jit
def _exp(x):
    # b is fp64 (module docstring, "Precision"); an exponent is rounded to fp32 only once formed.
    return tl.exp(x.to(tl.float32))


@triton.jit
def _chunk_decays(b, i_b, i_t, i_h, T, H: tl.constexpr, BT: tl.constexpr):
    """Offsets and validity of the chunk's tokens, their b_t, and B (b at the chunk's last token)."""
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    p_b = b + i_b.to(tl.int64) * T * H + i_h
    b_b = tl.load(p_b + o_t * H, mask=m_t, other=0.0)
    b_last = tl.load(p_b + (tl.minimum(i_t * BT + BT, T) - 1) * H)
    return o_t, m_t, b_b, b_last


@triton.jit
def chunk_local_cumsum_kernel(g, b, T, H: tl.constexpr, BT: tl.constexpr):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_g = i_b.to(tl.int64) * T * H + o_t * H + i_h
    # fp64: see "Precision" in the module docstring.
    b_g = tl.load(g + o_g, mask=m_t, other=0.0).to(tl.float64)
    tl.store(b + o_g, tl.cumsum(b_g, axis=0), mask=m_t)


@tuned(_configs({"BK": [32, 64], "BV": [32, 64]}), ["BT", "K", "V"])
@triton.jit
def chunk_fwd_h_kernel(
    k,
    v,
    b,
    h,
    h0,
    ht,
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
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = (i_b.to(tl.int64) * T * H + i_h) * K
    o_v = (i_b.to(tl.int64) * T * H + i_h) * V
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        p_h0, m_h0 = strided_tile(h0 + i_bh.to(tl.int64) * K * V, i_k * BK, i_v * BV, K, V, V, 1, BK, BV)
        b_h += tl.load(p_h0, mask=m_h0, other=0.0)
    for i_t in range(NT):
        p_h, m_h = strided_tile(
            h + (i_bh.to(tl.int64) * NT + i_t) * K * V, i_k * BK, i_v * BV, K, V, V, 1, BK, BV
        )
        tl.store(p_h, b_h.to(p_h.dtype.element_ty), mask=m_h)
        p_k, m_k = strided_tile(k + o_k, i_k * BK, i_t * BT, K, T, 1, H * K, BK, BT)
        p_v, m_v = strided_tile(v + o_v, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
        b_k = tl.load(p_k, mask=m_k, other=0.0)  # [BK, BT]
        b_v = tl.load(p_v, mask=m_v, other=0.0)  # [BT, BV]
        _, _, b_b, b_last = _chunk_decays(b, i_b, i_t, i_h, T, H, BT)
        b_k = (b_k * _exp(b_last - b_b)[None, :]).to(b_v.dtype)
        b_h = b_h * _exp(b_last) + tl.dot(b_k, b_v, input_precision=PRECISION)
    p_ht, m_ht = strided_tile(ht + i_bh.to(tl.int64) * K * V, i_k * BK, i_v * BV, K, V, V, 1, BK, BV)
    tl.store(p_ht, b_h, mask=m_ht)


@tuned(_configs({"BK": [32, 64], "BV": [32, 64, 128]}), ["BT", "K", "V"], prune=_FWD_O_PRUNE)
@triton.jit
def chunk_fwd_o_kernel(
    q,
    k,
    v,
    b,
    h,
    o,
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
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = (i_b.to(tl.int64) * T * H + i_h) * K
    o_v = (i_b.to(tl.int64) * T * H + i_h) * V
    o_h = (i_bh.to(tl.int64) * NT + i_t) * K * V
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        p_q, m_q = strided_tile(q + o_k, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
        p_k, m_k = strided_tile(k + o_k, i_k * BK, i_t * BT, K, T, 1, H * K, BK, BT)
        p_h, m_h = strided_tile(h + o_h, i_k * BK, i_v * BV, K, V, V, 1, BK, BV)
        b_q = tl.load(p_q, mask=m_q, other=0.0)
        b_k = tl.load(p_k, mask=m_k, other=0.0)
        b_h = tl.load(p_h, mask=m_h, other=0.0)
        b_o += tl.dot(b_q, b_h, input_precision=PRECISION)
        b_A += tl.dot(b_q, b_k, input_precision=PRECISION)
    o_t, m_t, b_b, _ = _chunk_decays(b, i_b, i_t, i_h, T, H, BT)
    # A[t, s] = q_t . k_s, kept for s <= t (and t a real token) with decay exp(b_t - b_s).
    m_A = (o_t[:, None] >= o_t[None, :]) & m_t[:, None]
    b_A = b_A * _exp(tl.where(m_A, b_b[:, None] - b_b[None, :], float("-inf")))
    p_v, m_v = strided_tile(v + o_v, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
    b_v = tl.load(p_v, mask=m_v, other=0.0)
    b_o = b_o * _exp(b_b)[:, None] + tl.dot(b_A.to(b_v.dtype), b_v, input_precision=PRECISION)
    p_o, m_o = strided_tile(o + o_v, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
    tl.store(p_o, (b_o * scale).to(p_o.dtype.element_ty), mask=m_o)


@tuned(_configs({"BK": [32, 64], "BV": [32, 64]}), ["BT", "K", "V"], prune=_BWD_DH_PRUNE)
@triton.jit
def chunk_bwd_dh_kernel(
    q,
    do,
    b,
    dh,
    dht,
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
    STORE_DH0: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = (i_b.to(tl.int64) * T * H + i_h) * K
    o_v = (i_b.to(tl.int64) * T * H + i_h) * V
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        p_dht, m_dht = strided_tile(dht + i_bh.to(tl.int64) * K * V, i_k * BK, i_v * BV, K, V, V, 1, BK, BV)
        b_dh += tl.load(p_dht, mask=m_dht, other=0.0)
    for i in range(NT):
        i_t = NT - 1 - i
        p_dh, m_dh = strided_tile(
            dh + (i_bh.to(tl.int64) * NT + i_t) * K * V, i_k * BK, i_v * BV, K, V, V, 1, BK, BV
        )
        tl.store(p_dh, b_dh.to(p_dh.dtype.element_ty), mask=m_dh)
        p_q, m_q = strided_tile(q + o_k, i_k * BK, i_t * BT, K, T, 1, H * K, BK, BT)
        p_do, m_do = strided_tile(do + o_v, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
        b_q = tl.load(p_q, mask=m_q, other=0.0)  # [BK, BT]
        b_do = tl.load(p_do, mask=m_do, other=0.0)  # [BT, BV]
        _, _, b_b, b_last = _chunk_decays(b, i_b, i_t, i_h, T, H, BT)
        b_q = (b_q * (scale * _exp(b_b))[None, :]).to(b_do.dtype)
        b_dh = b_dh * _exp(b_last) + tl.dot(b_q, b_do, input_precision=PRECISION)
    if STORE_DH0:
        p_dh0, m_dh0 = strided_tile(dh0 + i_bh.to(tl.int64) * K * V, i_k * BK, i_v * BV, K, V, V, 1, BK, BV)
        tl.store(p_dh0, b_dh, mask=m_dh0)


@tuned(_configs({"BK": [32, 64], "BV": [32, 64, 128]}), ["BT", "K", "V"], prune=_BWD_DV_PRUNE)
@triton.jit
def chunk_bwd_dv_kernel(
    q,
    k,
    do,
    b,
    dh,
    dv,
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
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = (i_b.to(tl.int64) * T * H + i_h) * K
    o_v = (i_b.to(tl.int64) * T * H + i_h) * V
    o_h = (i_bh.to(tl.int64) * NT + i_t) * K * V
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        p_k, m_k = strided_tile(k + o_k, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
        p_q, m_q = strided_tile(q + o_k, i_k * BK, i_t * BT, K, T, 1, H * K, BK, BT)
        p_dh, m_dh = strided_tile(dh + o_h, i_k * BK, i_v * BV, K, V, V, 1, BK, BV)
        b_k = tl.load(p_k, mask=m_k, other=0.0)
        b_q = tl.load(p_q, mask=m_q, other=0.0)
        b_dh = tl.load(p_dh, mask=m_dh, other=0.0)
        b_A += tl.dot(b_k, b_q, input_precision=PRECISION)
        b_dv += tl.dot(b_k, b_dh, input_precision=PRECISION)
    o_t, m_t, b_b, b_last = _chunk_decays(b, i_b, i_t, i_h, T, H, BT)
    # A[s, t] = k_s . q_t, kept for t >= s (and t a real token) with decay exp(b_t - b_s).
    m_A = (o_t[None, :] >= o_t[:, None]) & m_t[None, :]
    b_A = b_A * _exp(tl.where(m_A, b_b[None, :] - b_b[:, None], float("-inf"))) * scale
    p_do, m_do = strided_tile(do + o_v, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
    b_do = tl.load(p_do, mask=m_do, other=0.0)
    b_dv = b_dv * _exp(b_last - b_b)[:, None] + tl.dot(b_A.to(b_do.dtype), b_do, input_precision=PRECISION)
    p_dv, m_dv = strided_tile(dv + o_v, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
    tl.store(p_dv, b_dv.to(p_dv.dtype.element_ty), mask=m_dv)


@tuned(_configs({"BV": [32, 64]}), ["BT", "K", "V", "BK"], prune=_BWD_DQK_PRUNE)
@triton.jit
def chunk_bwd_dqk_kernel(
    q,
    k,
    v,
    do,
    b,
    h,
    dh,
    dq,
    dk,
    dg,
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
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = (i_b.to(tl.int64) * T * H + i_h) * K
    o_v = (i_b.to(tl.int64) * T * H + i_h) * V
    o_h = (i_bh.to(tl.int64) * NT + i_t) * K * V
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    b_dsd = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        p_v, m_v = strided_tile(v + o_v, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
        p_do, m_do = strided_tile(do + o_v, i_t * BT, i_v * BV, T, V, H * V, 1, BT, BV)
        # H_n and dS_n read transposed: [BV, BK] tiles of the [K, V] states.
        p_h, m_h = strided_tile(h + o_h, i_v * BV, i_k * BK, V, K, 1, V, BV, BK)
        p_dh, m_dh = strided_tile(dh + o_h, i_v * BV, i_k * BK, V, K, 1, V, BV, BK)
        b_v = tl.load(p_v, mask=m_v, other=0.0)
        b_do = tl.load(p_do, mask=m_do, other=0.0)
        b_h = tl.load(p_h, mask=m_h, other=0.0)
        b_dh = tl.load(p_dh, mask=m_dh, other=0.0)
        b_ds += tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        b_dq += tl.dot(b_do, b_h, input_precision=PRECISION)
        b_dk += tl.dot(b_v, b_dh, input_precision=PRECISION)
        b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=0)
        b_dsd += tl.sum(b_do.to(tl.float32) * b_v.to(tl.float32), axis=1)
    o_t, m_t, b_b, b_last = _chunk_decays(b, i_b, i_t, i_h, T, H, BT)
    o_i = tl.arange(0, BT)
    # ds[t, s] = scale * exp(b_t - b_s) do_t . v_s for s < t (t a real token). The diagonal, a token
    # paired with itself (no decay, spans no g), is kept apart as scale * do_t . v_t: it must not
    # enter dg, where it would only cancel.
    m_s = (o_t[:, None] > o_t[None, :]) & m_t[:, None]
    b_ds = b_ds * _exp(tl.where(m_s, b_b[:, None] - b_b[None, :], float("-inf"))) * scale
    p_q, m_q = strided_tile(q + o_k, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
    p_k, m_k = strided_tile(k + o_k, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
    b_q = tl.load(p_q, mask=m_q, other=0.0)
    b_k = tl.load(p_k, mask=m_k, other=0.0)
    # dg_t sums the pairs (query i, key j) whose decay spans t (j < t <= i), by where they lie
    # relative to this chunk (module docstring): b_c, keys here paired with later chunks, counts for
    # every later t; b_r, queries here paired with earlier chunks and with earlier keys here (minus
    # keys here paired with later queries here), for every t up to the query; exp(B) sum(H * dS),
    # pairs from before the chunk to after it, for every t.
    b_dq = b_dq * (scale * _exp(b_b))[:, None]
    b_dk = b_dk * _exp(b_last - b_b)[:, None]
    b_c = tl.sum(b_k.to(tl.float32) * b_dk, axis=1)
    b_dq = tl.dot(b_ds.to(b_k.dtype), b_k, b_dq, input_precision=PRECISION)
    b_r = tl.sum(b_q.to(tl.float32) * b_dq, axis=1)
    b_dk_intra = tl.dot(tl.trans(b_ds).to(b_q.dtype), b_q, input_precision=PRECISION)
    b_r -= tl.sum(b_k.to(tl.float32) * b_dk_intra, axis=1)
    b_dk += b_dk_intra
    b_dg = tl.cumsum(b_r, axis=0, reverse=True)
    b_dg += tl.sum(tl.where(o_i[:, None] > o_i[None, :], b_c[None, :], 0.0), axis=1)
    b_dg += _exp(b_last) * tl.sum(b_hdh, axis=0)
    b_dq += (scale * b_dsd)[:, None] * b_k.to(tl.float32)
    b_dk += (scale * b_dsd)[:, None] * b_q.to(tl.float32)
    p_dq, m_dq = strided_tile(dq + o_k, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
    p_dk, m_dk = strided_tile(dk + o_k, i_t * BT, i_k * BK, T, K, H * K, 1, BT, BK)
    tl.store(p_dq, b_dq.to(p_dq.dtype.element_ty), mask=m_dq)
    tl.store(p_dk, b_dk.to(p_dk.dtype.element_ty), mask=m_dk)
    # dg is [NK, B, T, H]: one partial per K tile, summed by the launcher when there are several.
    n_b = tl.num_programs(2) // H
    tl.store(dg + ((i_k * n_b + i_b).to(tl.int64) * T + o_t) * H + i_h, b_dg, mask=m_t)


def chunk_gla_fwd(q, k, v, g, scale: float, initial_state, chunk_size: int):
    """Launch the forward kernels.

    q, k `[B, T, H, K]`, v `[B, T, H, V]` (one dtype), g `[B, T, H]` fp32, initial_state
    `[B, H, K, V]` fp32 or None; all contiguous. Returns `o [B, T, H, V]` in v's dtype, the per-chunk
    entering states `h [B, H, NT, K, V]` in q's dtype, the within-chunk prefix sums `b [B, T, H]` fp64
    and the final state `[B, H, K, V]` fp32.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT = chunk_size
    NT = triton.cdiv(T, BT)
    b = torch.empty(B, T, H, dtype=torch.float64, device=q.device)
    chunk_local_cumsum_kernel[(NT, B * H)](g, b, T, H=H, BT=BT, num_warps=1)
    h = torch.empty(B, H, NT, K, V, dtype=q.dtype, device=q.device)
    final_state = torch.empty(B, H, K, V, dtype=torch.float32, device=q.device)

    def grid_h(meta):
        return (triton.cdiv(K, meta["BK"]), triton.cdiv(V, meta["BV"]), B * H)

    chunk_fwd_h_kernel[grid_h](
        k, v, b, h, initial_state, final_state, T, NT, H=H, K=K, V=V, BT=BT,
        USE_H0=initial_state is not None, PRECISION=dot_precision(q.dtype),
    )  # fmt: skip
    o = torch.empty(B, T, H, V, dtype=v.dtype, device=q.device)

    def grid_o(meta):
        return (triton.cdiv(V, meta["BV"]), NT, B * H)

    chunk_fwd_o_kernel[grid_o](
        q, k, v, b, h, o, scale, T, NT, H=H, K=K, V=V, BT=BT, PRECISION=dot_precision(q.dtype)
    )
    return o, h, b, final_state


def chunk_gla_bwd(q, k, v, b, h, do, dht, scale: float, chunk_size: int, need_dh0: bool):
    """Launch the backward kernels. `do` `[B, T, H, V]`, `dht` the final state's gradient or None.

    Returns `(dq, dk, dv, dg fp32, dh0 fp32 or None)`.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT = chunk_size
    NT = triton.cdiv(T, BT)
    precision = dot_precision(q.dtype)
    dh = torch.empty(B, H, NT, K, V, dtype=q.dtype, device=q.device)
    dh0 = torch.empty(B, H, K, V, dtype=torch.float32, device=q.device) if need_dh0 else None

    def grid_h(meta):
        return (triton.cdiv(K, meta["BK"]), triton.cdiv(V, meta["BV"]), B * H)

    chunk_bwd_dh_kernel[grid_h](
        q, do, b, dh, dht, dh0, scale, T, NT, H=H, K=K, V=V, BT=BT,
        USE_DHT=dht is not None, STORE_DH0=need_dh0, PRECISION=precision,
    )  # fmt: skip
    dv = torch.empty(B, T, H, V, dtype=v.dtype, device=q.device)

    def grid_v(meta):
        return (triton.cdiv(V, meta["BV"]), NT, B * H)

    chunk_bwd_dv_kernel[grid_v](q, k, do, b, dh, dv, scale, T, NT, H=H, K=K, V=V, BT=BT, PRECISION=precision)
    BK = min(_TILE, head_dim_tile(K))
    NK = triton.cdiv(K, BK)
    dq = torch.empty(B, T, H, K, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, T, H, K, dtype=k.dtype, device=q.device)
    dg = torch.empty(NK, B, T, H, dtype=torch.float32, device=q.device)
    chunk_bwd_dqk_kernel[(NK, NT, B * H)](
        q, k, v, do, b, h, dh, dq, dk, dg, scale, T, NT, H=H, K=K, V=V, BT=BT, BK=BK, PRECISION=precision
    )
    return dq, dk, dv, dg[0] if NK == 1 else dg.sum(0), dh0


class ChunkGatedLinearAttnFunction(torch.autograd.Function):
    """Autograd over the chunked kernels; the final state is an output with a gradient of its own."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, output_final_state, chunk_size):
        o, h, b, final_state = chunk_gla_fwd(q, k, v, g, scale, initial_state, chunk_size)
        ctx.save_for_backward(q, k, v, b, h)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        ctx.has_initial_state = initial_state is not None
        return o, (final_state if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, b, h = ctx.saved_tensors
        need_dh0 = ctx.has_initial_state and ctx.needs_input_grad[5]
        dq, dk, dv, dg, dh0 = chunk_gla_bwd(
            q, k, v, b, h, do.contiguous(),
            None if dht is None else dht.float().contiguous(), ctx.scale, ctx.chunk_size, need_dh0,
        )  # fmt: skip
        return dq, dk, dv, dg, None, dh0, None, None


def chunk_gated_linear_attn(
    q, k, v, g, scale=None, initial_state=None, output_final_state=False, chunk_size=64
):
    """The Triton path of `longctx.kernels.gated_linear_attn` (see there); `chunk_size` is the chunk
    length BT, a power of two from 16 to 128. Inputs are made contiguous, k and v take q's dtype, and g
    and the initial state are used in fp32."""
    if chunk_size not in (16, 32, 64, 128):
        raise ValueError(f"chunk_size must be 16, 32, 64 or 128 (a tl.dot tile), got {chunk_size}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton kernel takes fp16, bf16 or fp32 inputs, got {q.dtype}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    q = q.contiguous()
    k, v = k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous()
    g = g.float().contiguous()
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    return ChunkGatedLinearAttnFunction.apply(
        q, k, v, g, scale, initial_state, output_final_state, chunk_size
    )
