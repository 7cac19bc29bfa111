"""Triton S2 block-sparse flash attention: forward, backward and log-sum-exp.

FlashAttention-2 restricted to the blocks S2 allows. The pattern is compiled once per shape into CSR
tile lists (`blocks.py`); every program walks only its own list, so work and memory traffic scale
with the number of allowed blocks, not with T^2.

- forward: one program per (batch, query head, query tile); it walks the key blocks listed for its
  (head, query tile) with an online softmax and writes `o` and `lse` (natural log, fp32).
- backward, recomputing the probabilities from `lse` (FA2), in three launches:
  1. `delta = rowsum(o * do) - dlse` (the `dlse` term makes `lse` differentiable, which the
     context-parallel merge of partial results needs);
  2. dQ: one program per (batch, query head, query tile), the forward's walk;
  3. dK/dV: one program per (batch, KV head, key tile). It walks, for each query head of its GQA
     group in turn, that head's transposed list (the query blocks that attend its key tile), and
     accumulates dK and dV in registers for the whole group before one store. No atomics: the result
     is deterministic, nothing is zero-initialised or written twice, and the fp32 accumulators never
     leave registers. The price is one more recomputation of `q k^T` than an atomic dQ would need
     (7 block matmuls per pair instead of 5), as in the Triton FA2 backward. S2's transposed lists are
     very uneven (a strided key block is attended by every later query block of its head, a
     local-only one by `local_blocks` of them); the lists' `order` launches long programs first.

Tiles: a program's outer tile is `BT` rows (a power of two that divides `block_size` or equals two
blocks), its inner tile `BI` rows of one listed block. The host splits each list into entries that
need no mask (loaded and computed bare) and a few that do (diagonal blocks, blocks only part of the
tile may see, partial last blocks), where the kernel applies S2's rule token by token.

Per-kv-head key blocks: `k_ids` is one id list for every kv head (`stride_kid = 0`) or a `[H_kv, n]`
table (`stride_kid = n`; `k`, `v` then `[B, n * bs, H_kv, D]` views of a compact `[B, H_kv, n, bs, D]`
buffer); a program reads its kv head's row. Unused slots (`-1`) are never listed, and where a 2-block
dK/dV tile holds one, the S2 rule masks it (`kb >= 0`), so its gradient is exactly zero.

Documents (`doc_start`, each query's document start): the pattern is unchanged (blocks are counted in
global block positions); a listed block that ends before every row of the tile's document is skipped
before anything is loaded, and the others are masked to each row's document (`k_pos >= doc_start`).

On the GPU a small autotuner times the candidate tile configurations once per shape class (the tile
size changes the lists, which `triton.autotune` cannot follow); under `TRITON_INTERPRET=1` one fixed
configuration runs.
"""

import torch
import triton
import triton.language as tl

from longctx.kernels.common import tuning
from longctx.kernels.common.backend import interpreting
from longctx.kernels.common.triton import (
    LOG2E,
    LOG2E_C,
    doc_start_arg,
    dot_precision,
    head_dim_tile,
    softmax_finish,
    softmax_init,
    softmax_step,
)
from longctx.kernels.s2_attn.blocks import (
    S2BlockLists,
    TileLists,
    check_block_ids,
    check_block_table,
    s2_block_lists,
)


@triton.jit
def _row_ptrs(p_base, start, stride_t, B: tl.constexpr, BD: tl.constexpr):
    """Pointers to rows `start .. start + B` x `BD` columns: the row offset one int64 scalar, offsets
    within the tile int32."""
    o_b = tl.arange(0, B)
    o_d = tl.arange(0, BD)
    return p_base + start.to(tl.int64) * stride_t + (o_b[:, None] * stride_t + o_d[None, :])


@triton.jit
def _load_rows(
    p_base, start, stride_t, T, B: tl.constexpr, HEAD_DIM: tl.constexpr, BD: tl.constexpr,
    MASK_T: tl.constexpr,
):  # fmt: skip
    """Rows `start .. start + B` (x head dim) of a `[T, D]` slice; masks rows past `T` only when `MASK_T`.

    The row offset is one int64 scalar; offsets within the tile stay int32.
    """
    o_b = tl.arange(0, B)
    o_d = tl.arange(0, BD)
    ptrs = _row_ptrs(p_base, start, stride_t, B, BD)
    if MASK_T:
        x = tl.load(ptrs, mask=((start + o_b) < T)[:, None] & (o_d[None, :] < HEAD_DIM), other=0.0)
    elif BD != HEAD_DIM:
        x = tl.load(ptrs, mask=o_d[None, :] < HEAD_DIM, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _base(p, i_b, i_h, stride_b, stride_h):
    """Pointer to (batch i_b, head i_h) of a [B, T, H, D] tensor, in int64: a head-major layout has
    stride_h = T*D, and H*T*D passes 2^31 at long contexts."""
    return p + i_b.to(tl.int64) * stride_b + i_h.to(tl.int64) * stride_h


@triton.jit
def _tile_rows(order, i_p, BS: tl.constexpr, BT: tl.constexpr):
    """The tile (a list row) and the first tensor row of program `i_p` for outer tiles of `BT` rows."""
    if BT <= BS:
        n_sub: tl.constexpr = BS // BT
        i_tile = tl.load(order + i_p // n_sub)
        start = i_tile * BS + (i_p % n_sub) * BT
    else:
        i_tile = tl.load(order + i_p)
        start = i_tile * BT
    return i_tile, start


@triton.jit
def _s2_allowed(qb, kb, i_h, local_blocks, vert_stride, head_step, dense_from):
    """DESIGN.md's S2 rule for global query / key block ids (broadcasting); `kb = -1` (an unused slot
    of a block table) is never allowed."""
    strided = (kb + 1 + i_h * head_step) % vert_stride == 0
    return (kb >= 0) & (kb <= qb) & ((qb - kb < local_blocks) | strided | (i_h >= dense_from))


@triton.jit
def _row_doc_starts(doc_start, i_b, o_m, m_m, T_q, HAS_DOCS: tl.constexpr):
    """Each row's document start (global position) and the earliest of them (0s without documents)."""
    ds_m = tl.zeros(o_m.shape, dtype=tl.int32)
    ds_min = 0
    if HAS_DOCS:
        ds_m = tl.load(doc_start + i_b.to(tl.int64) * T_q + o_m, mask=m_m, other=0)
        ds_min = tl.min(tl.where(m_m, ds_m, 2147483647), 0)
    return ds_m, ds_min


@triton.jit
def _fwd_walk(
    acc, l_i, m_i, b_q, qb_m, pos_m, ds_m, ds_min, p_k, p_v, stride_kt, stride_vt, k_ids, indices, lo, hi,
    T_k, i_h, qk_scale, local_blocks, vert_stride, head_step, dense_from,
    HEAD_DIM: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr,
    HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Online softmax over the key blocks `indices[lo:hi]`; `MASK` applies S2's token rule. With
    documents (`ds_m`: each row's document start), a block ending before every row's document is
    skipped (nothing loaded) and the others are masked to each row's document."""
    for e in range(lo, hi):
        i_kb = tl.load(indices + e)
        kb = tl.load(k_ids + i_kb)
        live = True
        if HAS_DOCS:
            live = kb * BS + BS > ds_min
        if live:
            for n in tl.static_range(0, BS, BN):
                o_n = i_kb * BS + n + tl.arange(0, BN)
                m_n = o_n < T_k
                pos_n = kb * BS + n + tl.arange(0, BN)
                b_k = _load_rows(p_k, i_kb * BS + n, stride_kt, T_k, BN, HEAD_DIM, BD, MASK)
                b_v = _load_rows(p_v, i_kb * BS + n, stride_vt, T_k, BN, HEAD_DIM, BD, MASK)
                b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale  # [BM, BN], log2
                if MASK:
                    ok = _s2_allowed(qb_m, kb, i_h, local_blocks, vert_stride, head_step, dense_from)
                    m_s = ok[:, None] & (pos_n[None, :] <= pos_m[:, None]) & m_n[None, :]
                    if HAS_DOCS:
                        m_s = m_s & (pos_n[None, :] >= ds_m[:, None])
                    b_s = tl.where(m_s, b_s, float("-inf"))
                elif HAS_DOCS:
                    b_s = tl.where(pos_n[None, :] >= ds_m[:, None], b_s, float("-inf"))
                acc, l_i, m_i = softmax_step(acc, l_i, m_i, b_s, b_v, PRECISION)
    return acc, l_i, m_i


@triton.jit
def _s2_fwd_kernel(
    q, k, v, o, lse, q_ids, k_ids, stride_kid, doc_start, order, offsets, split, indices,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
    T_q, T_k, n_tiles, n_heads, group, qk_scale, local_blocks, vert_stride, head_step, dense_from,
    HEAD_DIM: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // n_heads, i_bh % n_heads
    i_hk = i_h // group
    # This kv head's key block ids (stride 0: one list shared by every kv head).
    k_ids += i_hk.to(tl.int64) * stride_kid
    i_tile, start = _tile_rows(order, i_m, BS, BM)
    o_m = start + tl.arange(0, BM)
    m_m = o_m < T_q
    qb_m = tl.load(q_ids + o_m // BS, mask=m_m, other=0)  # global block of each row
    pos_m = qb_m * BS + o_m % BS
    ds_m, ds_min = _row_doc_starts(doc_start, i_b, o_m, m_m, T_q, HAS_DOCS)
    o_d = tl.arange(0, BD)

    p_k = _base(k, i_b, i_hk, stride_kb, stride_kh)
    p_v = _base(v, i_b, i_hk, stride_vb, stride_vh)
    b_q = _load_rows(
        _base(q, i_b, i_h, stride_qb, stride_qh),
        start, stride_qt, T_q, BM, HEAD_DIM, BD, True,
    )

    row = i_h * n_tiles + i_tile
    lo = tl.load(offsets + row)
    mid = tl.load(split + row)
    hi = tl.load(offsets + row + 1)
    acc, l_i, m_i = softmax_init(BM, BD)
    acc, l_i, m_i = _fwd_walk(
        acc, l_i, m_i, b_q, qb_m, pos_m, ds_m, ds_min, p_k, p_v, stride_kt, stride_vt, k_ids, indices,
        lo, mid, T_k, i_h, qk_scale, local_blocks, vert_stride, head_step, dense_from,
        HEAD_DIM, BD, BS, BN, False, HAS_DOCS, PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_walk(
        acc, l_i, m_i, b_q, qb_m, pos_m, ds_m, ds_min, p_k, p_v, stride_kt, stride_vt, k_ids, indices,
        mid, hi, T_k, i_h, qk_scale, local_blocks, vert_stride, head_step, dense_from,
        HEAD_DIM, BD, BS, BN, True, HAS_DOCS, PRECISION,
    )  # fmt: skip

    acc, b_lse = softmax_finish(acc, l_i, m_i)
    p_o = _base(o, i_b, i_h, stride_ob, stride_oh)
    p_o += o_m[:, None].to(tl.int64) * stride_ot
    tl.store(p_o + o_d[None, :], acc.to(o.dtype.element_ty), mask=m_m[:, None] & (o_d[None, :] < HEAD_DIM))
    tl.store(lse + i_bh.to(tl.int64) * T_q + o_m, b_lse, mask=m_m)


@triton.jit
def _s2_bwd_preprocess_kernel(
    o, do, dlse, delta, stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh, T_q, n_heads,
    HEAD_DIM: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, HAS_DLSE: tl.constexpr,
):  # fmt: skip
    """`delta = rowsum(o * do) - dlse`, `[B, H, T]` fp32."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // n_heads, i_bh % n_heads
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < T_q
    p_o = _base(o, i_b, i_h, stride_ob, stride_oh)
    p_do = _base(do, i_b, i_h, stride_dob, stride_doh)
    b_o = _load_rows(p_o, i_m * BM, stride_ot, T_q, BM, HEAD_DIM, BD, True).to(tl.float32)
    b_do = _load_rows(p_do, i_m * BM, stride_dot, T_q, BM, HEAD_DIM, BD, True).to(tl.float32)
    b_delta = tl.sum(b_o * b_do, 1)
    if HAS_DLSE:
        b_delta -= tl.load(dlse + i_bh.to(tl.int64) * T_q + o_m, mask=m_m, other=0.0)
    tl.store(delta + i_bh.to(tl.int64) * T_q + o_m, b_delta, mask=m_m)


@triton.jit
def _dq_walk(
    b_dq, b_q, b_do, b_lse, b_delta, qb_m, pos_m, ds_m, ds_min, p_k, p_v, stride_kt, stride_vt, k_ids,
    indices, lo, hi, T_k, i_h, qk_scale, local_blocks, vert_stride, head_step, dense_from,
    HEAD_DIM: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr,
    HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    for e in range(lo, hi):
        i_kb = tl.load(indices + e)
        kb = tl.load(k_ids + i_kb)
        live = True
        if HAS_DOCS:
            live = kb * BS + BS > ds_min
        if live:
            for n in tl.static_range(0, BS, BN):
                o_n = i_kb * BS + n + tl.arange(0, BN)
                m_n = o_n < T_k
                pos_n = kb * BS + n + tl.arange(0, BN)
                b_k = _load_rows(p_k, i_kb * BS + n, stride_kt, T_k, BN, HEAD_DIM, BD, MASK)
                b_v = _load_rows(p_v, i_kb * BS + n, stride_vt, T_k, BN, HEAD_DIM, BD, MASK)
                b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
                if MASK:
                    ok = _s2_allowed(qb_m, kb, i_h, local_blocks, vert_stride, head_step, dense_from)
                    m_s = ok[:, None] & (pos_n[None, :] <= pos_m[:, None]) & m_n[None, :]
                    if HAS_DOCS:
                        m_s = m_s & (pos_n[None, :] >= ds_m[:, None])
                    b_s = tl.where(m_s, b_s, float("-inf"))
                elif HAS_DOCS:
                    b_s = tl.where(pos_n[None, :] >= ds_m[:, None], b_s, float("-inf"))
                b_p = tl.exp2(b_s - b_lse[:, None])
                b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
                b_ds = b_p * (b_dp - b_delta[:, None])
                b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)
    return b_dq


@triton.jit
def _s2_bwd_dq_kernel(
    q, k, v, do, dq, lse, delta, q_ids, k_ids, stride_kid, doc_start, order, offsets, split, indices,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh,
    T_q, T_k, n_tiles, n_heads, group, qk_scale, scale, local_blocks, vert_stride, head_step, dense_from,
    HEAD_DIM: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // n_heads, i_bh % n_heads
    i_hk = i_h // group
    # This kv head's key block ids (stride 0: one list shared by every kv head).
    k_ids += i_hk.to(tl.int64) * stride_kid
    i_tile, start = _tile_rows(order, i_m, BS, BM)
    o_m = start + tl.arange(0, BM)
    m_m = o_m < T_q
    qb_m = tl.load(q_ids + o_m // BS, mask=m_m, other=0)
    pos_m = qb_m * BS + o_m % BS
    ds_m, ds_min = _row_doc_starts(doc_start, i_b, o_m, m_m, T_q, HAS_DOCS)
    o_d = tl.arange(0, BD)

    p_k = _base(k, i_b, i_hk, stride_kb, stride_kh)
    p_v = _base(v, i_b, i_hk, stride_vb, stride_vh)
    b_q = _load_rows(
        _base(q, i_b, i_h, stride_qb, stride_qh),
        start, stride_qt, T_q, BM, HEAD_DIM, BD, True,
    )
    b_do = _load_rows(
        _base(do, i_b, i_h, stride_dob, stride_doh),
        start, stride_dot, T_q, BM, HEAD_DIM, BD, True,
    )
    b_lse = tl.load(lse + i_bh.to(tl.int64) * T_q + o_m, mask=m_m, other=float("inf")) * LOG2E_C
    # A row that saw no key (lse = -inf) gets p = 0 instead of exp2(+inf).
    b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse)
    b_delta = tl.load(delta + i_bh.to(tl.int64) * T_q + o_m, mask=m_m, other=0.0)

    row = i_h * n_tiles + i_tile
    lo = tl.load(offsets + row)
    mid = tl.load(split + row)
    hi = tl.load(offsets + row + 1)
    b_dq = tl.zeros([BM, BD], dtype=tl.float32)
    b_dq = _dq_walk(
        b_dq, b_q, b_do, b_lse, b_delta, qb_m, pos_m, ds_m, ds_min, p_k, p_v, stride_kt, stride_vt, k_ids,
        indices, lo, mid, T_k, i_h, qk_scale, local_blocks, vert_stride, head_step, dense_from,
        HEAD_DIM, BD, BS, BN, False, HAS_DOCS, PRECISION,
    )  # fmt: skip
    b_dq = _dq_walk(
        b_dq, b_q, b_do, b_lse, b_delta, qb_m, pos_m, ds_m, ds_min, p_k, p_v, stride_kt, stride_vt, k_ids,
        indices, mid, hi, T_k, i_h, qk_scale, local_blocks, vert_stride, head_step, dense_from,
        HEAD_DIM, BD, BS, BN, True, HAS_DOCS, PRECISION,
    )  # fmt: skip
    p_dq = _base(dq, i_b, i_h, stride_dqb, stride_dqh)
    p_dq += o_m[:, None].to(tl.int64) * stride_dqt
    m_md = m_m[:, None] & (o_d[None, :] < HEAD_DIM)
    tl.store(p_dq + o_d[None, :], (b_dq * scale).to(dq.dtype.element_ty), mask=m_md)


@triton.jit
def _dkdv_walk(
    b_dk, b_dv, b_k, b_v, kb_n, pos_n, k_end, p_q, p_do, p_lse, p_delta, p_ds, stride_qt, stride_dot, q_ids,
    indices, lo, hi, T_q, i_h, qk_scale, local_blocks, vert_stride, head_step, dense_from,
    HEAD_DIM: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, BM: tl.constexpr, MASK: tl.constexpr,
    HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Accumulate dK, dV `[BN, BD]` over the query blocks `indices[lo:hi]` (scores transposed, `[BN, BM]`).
    With documents (`p_ds`: each query's document start), query rows whose documents all begin after
    the key tile (`k_end`: its last global position + 1) are skipped, the others masked."""
    for e in range(lo, hi):
        i_qb = tl.load(indices + e)
        for m in tl.static_range(0, BS, BM):
            o_m = i_qb * BS + m + tl.arange(0, BM)
            m_m = o_m < T_q
            ds_q = tl.zeros([BM], dtype=tl.int32)
            live = True
            if HAS_DOCS:
                ds_q = tl.load(p_ds + o_m, mask=m_m, other=2147483647)
                live = tl.min(ds_q, 0) < k_end
            if live:
                b_dk, b_dv = _dkdv_tile(
                    b_dk, b_dv, b_k, b_v, kb_n, pos_n, ds_q, p_q, p_do, p_lse, p_delta, stride_qt,
                    stride_dot, q_ids, i_qb, m, o_m, m_m, T_q, i_h, qk_scale, local_blocks, vert_stride,
                    head_step, dense_from, HEAD_DIM, BD, BS, BM, MASK, HAS_DOCS, PRECISION,
                )  # fmt: skip
    return b_dk, b_dv


@triton.jit
def _dkdv_tile(
    b_dk, b_dv, b_k, b_v, kb_n, pos_n, ds_q, p_q, p_do, p_lse, p_delta, stride_qt, stride_dot, q_ids, i_qb,
    m, o_m, m_m, T_q, i_h, qk_scale, local_blocks, vert_stride, head_step, dense_from,
    HEAD_DIM: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, BM: tl.constexpr, MASK: tl.constexpr,
    HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One `[BM]`-row query tile's share of dK, dV."""
    b_q = _load_rows(p_q, i_qb * BS + m, stride_qt, T_q, BM, HEAD_DIM, BD, MASK)
    b_do = _load_rows(p_do, i_qb * BS + m, stride_dot, T_q, BM, HEAD_DIM, BD, MASK)
    if MASK:
        # Padded query rows get lse = +inf, hence p = 0; so do rows that saw no key.
        b_lse = tl.load(p_lse + o_m, mask=m_m, other=float("inf")) * LOG2E_C
        b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse)
        b_delta = tl.load(p_delta + o_m, mask=m_m, other=0.0)
    else:
        b_lse = tl.load(p_lse + o_m) * LOG2E_C
        if HAS_DOCS:
            # A row whose document starts after this key set saw no key (lse = -inf): p = 0.
            b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse)
        b_delta = tl.load(p_delta + o_m)
    b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION) * qk_scale  # [BN, BM]
    if MASK:
        qb = tl.load(q_ids + i_qb)
        pos_m = qb * BS + m + tl.arange(0, BM)
        ok = _s2_allowed(qb, kb_n, i_h, local_blocks, vert_stride, head_step, dense_from)
        m_st = ok[:, None] & (pos_n[:, None] <= pos_m[None, :])
        if HAS_DOCS:
            m_st = m_st & (pos_n[:, None] >= ds_q[None, :])
        b_st = tl.where(m_st, b_st, float("-inf"))
    elif HAS_DOCS:
        b_st = tl.where(pos_n[:, None] >= ds_q[None, :], b_st, float("-inf"))
    b_pt = tl.exp2(b_st - b_lse[None, :])
    b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PRECISION)
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)
    b_dst = b_pt * (b_dpt - b_delta[None, :])
    b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PRECISION)
    return b_dk, b_dv


@triton.jit
def _s2_bwd_dkdv_kernel(
    q, k, v, do, dk, dv, lse, delta, q_ids, k_ids, stride_kid, doc_start, order, offsets, split, indices,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh, T_q, T_k, n_tiles, n_heads, n_kv_heads, group, qk_scale, scale,
    local_blocks, vert_stride, head_step, dense_from,
    HEAD_DIM: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bh // n_kv_heads, i_bh % n_kv_heads
    i_tile, start = _tile_rows(order, i_n, BS, BN)
    o_n = start + tl.arange(0, BN)
    m_n = o_n < T_k
    kb_n = tl.load(k_ids + i_hk.to(tl.int64) * stride_kid + o_n // BS, mask=m_n, other=0)
    pos_n = kb_n * BS + o_n % BS
    k_end = tl.max(tl.where(m_n, pos_n, -1), 0) + 1
    p_ds = doc_start + i_b.to(tl.int64) * T_q
    o_d = tl.arange(0, BD)

    b_k = _load_rows(
        _base(k, i_b, i_hk, stride_kb, stride_kh), start, stride_kt, T_k, BN, HEAD_DIM, BD, True
    )
    b_v = _load_rows(
        _base(v, i_b, i_hk, stride_vb, stride_vh), start, stride_vt, T_k, BN, HEAD_DIM, BD, True
    )
    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BD], dtype=tl.float32)
    for g in range(0, group):
        i_h = i_hk * group + g
        p_q = _base(q, i_b, i_h, stride_qb, stride_qh)
        p_do = _base(do, i_b, i_h, stride_dob, stride_doh)
        p_lse = lse + (i_b * n_heads + i_h).to(tl.int64) * T_q
        p_delta = delta + (i_b * n_heads + i_h).to(tl.int64) * T_q
        row = i_h * n_tiles + i_tile
        lo = tl.load(offsets + row)
        mid = tl.load(split + row)
        hi = tl.load(offsets + row + 1)
        b_dk, b_dv = _dkdv_walk(
            b_dk, b_dv, b_k, b_v, kb_n, pos_n, k_end, p_q, p_do, p_lse, p_delta, p_ds, stride_qt,
            stride_dot, q_ids, indices, lo, mid, T_q, i_h, qk_scale, local_blocks, vert_stride, head_step,
            dense_from, HEAD_DIM, BD, BS, BM, False, HAS_DOCS, PRECISION,
        )  # fmt: skip
        b_dk, b_dv = _dkdv_walk(
            b_dk, b_dv, b_k, b_v, kb_n, pos_n, k_end, p_q, p_do, p_lse, p_delta, p_ds, stride_qt,
            stride_dot, q_ids, indices, mid, hi, T_q, i_h, qk_scale, local_blocks, vert_stride, head_step,
            dense_from, HEAD_DIM, BD, BS, BM, True, HAS_DOCS, PRECISION,
        )  # fmt: skip

    m_store = m_n[:, None] & (o_d[None, :] < HEAD_DIM)
    p_dk = _base(dk, i_b, i_hk, stride_dkb, stride_dkh) + o_n[:, None].to(tl.int64) * stride_dkt
    tl.store(p_dk + o_d[None, :], (b_dk * scale).to(dk.dtype.element_ty), mask=m_store)
    p_dv = _base(dv, i_b, i_hk, stride_dvb, stride_dvh) + o_n[:, None].to(tl.int64) * stride_dvt
    tl.store(p_dv + o_d[None, :], b_dv.to(dv.dtype.element_ty), mask=m_store)


# A launch configuration: outer tile rows, inner tile rows, warps, pipeline stages.
Config = tuple[int, int, int, int]
# 16-bit candidates that spill only where the head dim is padded (96), per arch family (`candidates`).
_PADDED_SPILLS = {
    "ampere": {"fwd": ((64, 32, 8, 2), (64, 32, 8, 3), (32, 64, 8, 2))},
    "hopper": {"dq": ((32, 64, 8, 2),)},
}


def candidates(
    name: str, block_size: int, head_dim: int, elem_bytes: int = 2, arch: int | None = None
) -> list[Config]:
    """Tile configurations the tuner may pick for kernel `name` ("fwd", "dq" or "dkdv"), the default
    (`LONGCTX_TUNE=off`) first: among the three largest outer tiles (<= 128 rows; a divisor of the
    block or two blocks) and the two largest inner tiles (<= 64 rows, dividing the block), with 4 or 8
    warps and 2 or 3 stages. fp32 inputs and head dims over 128 halve the limits (registers and shared
    memory). At head dims <= 128 in 16-bit those that spill registers on sm_90 are left out (measured
    with `python -m longctx.kernels.aot`): 128-row forward / dQ tiles on 4 warps, 32x64 on 8 warps and
    3 stages, and every dK/dV tile but the 32-row ones on 8 warps (dK/dV keeps two fp32 accumulators
    and recomputes P and dP). On sm_8x (`arch` < 90; None: no GPU known) mma.sync holds its operands in
    registers and more of them spill (sm_80, hd 128, bf16, causal): forward 128x32 on 8 warps (8-16 B)
    and 64x32 on 4 warps (136-144 B); dQ every 128-row tile (24-64 B), 64x64 on 4 warps (8 B) and
    64x32 (4,520-5,384 B). Those are left out there too; dK/dV's 32-row tiles do not spill. A head dim
    that is not a power of two (96: its tile padded to 128 and masked) costs a few more registers, and
    the full AOT matrix (bf16 and fp16) found more spilling there: on sm_8x the forward's 64x32 on 8
    warps and 32x64 on 8 warps and 2 stages (8 B), on sm_90 dQ's 32x64 on 8 warps and 2 stages (16 B);
    those are left out at such head dims."""
    bd = head_dim_tile(head_dim)
    small = elem_bytes > 2 or bd > 128
    top_outer, top_inner = (64, 32) if small else (128, 64)
    outer = [t for t in (128, 64, 32, 16) if t <= top_outer and (t == 2 * block_size or block_size % t == 0)]
    inner = [t for t in (64, 32, 16) if t <= top_inner and block_size % t == 0]
    configs = [(o, i, w, s) for o in outer[:3] for i in inner[:2] for w in (4, 8) for s in (2, 3)]
    if not small:
        if name == "dkdv":
            kept = [c for c in configs if c[0] <= 32 and c[2] == 8]
        else:
            kept = [c for c in configs if not (c[0] == 128 and c[2] == 4) and c != (32, 64, 8, 3)]
        ampere = tuning.sm8x(arch)
        if ampere and name == "fwd":
            kept = [c for c in kept if c[0] <= 32 or c[1] == 64 or c[:3] == (64, 32, 8)]
        elif ampere and name == "dq":
            kept = [c for c in kept if c[0] <= 32 or c[:3] == (64, 64, 8)]
        if head_dim != bd:
            padded = _PADDED_SPILLS["ampere" if ampere else "hopper"].get(name, ())
            kept = [c for c in kept if c not in padded]
        configs = kept or configs[-1:]
    if name == "dkdv" and not small:
        preferred = (32, 64, 8, 2)
    elif name == "dq" and not small and tuning.sm8x(arch):
        preferred = (64, 64, 8, 2)
    else:
        preferred = (64, 64, 4, 2)
    return sorted(configs, key=lambda c: c != preferred)


def _check_tiles(block_size: int, tiles: tuple[int, int]) -> None:
    outer, inner = tiles
    powers = all(t >= 16 and t & (t - 1) == 0 for t in tiles)
    if not powers or block_size % inner or not (block_size % outer == 0 or outer == 2 * block_size):
        raise ValueError(
            f"tiles {tiles} must be powers of two >= 16: the outer one dividing block_size={block_size} "
            f"or equal to two blocks, the inner one dividing it"
        )


def _run_tuned(name: str, key: tuple, launch, block_size: int, head_dim: int, elem_bytes: int, tiles) -> None:
    """Launch with `tiles` if given (or one fixed config under the interpreter), else the fastest
    candidate for `key`, timed on first use."""
    if tiles is not None or interpreting():
        if tiles is None:
            tiles = (min(block_size, 64), min(block_size, 64))
        _check_tiles(block_size, tiles)
        launch((*tiles, 4, 2))
        return

    def bench(config: Config) -> float:
        from triton.testing import do_bench

        return do_bench(lambda: launch(config), warmup=5, rep=20)

    arch = tuning.device_arch()
    launch(tuning.choose(f"s2_{name}", key, candidates(name, block_size, head_dim, elem_bytes, arch), bench))


def _pattern_args(lists: S2BlockLists) -> tuple:
    local_blocks, vert_stride, dense_heads = lists.pattern
    head_step = max(1, vert_stride // lists.n_heads)
    return local_blocks, vert_stride, head_step, lists.n_heads - dense_heads


def _tile_args(tile_lists: TileLists) -> tuple:
    return tile_lists.order, tile_lists.offsets, tile_lists.split, tile_lists.indices


def _grid(tile_lists: TileLists, block_size: int, rows: int, batch_heads: int) -> tuple[int, int]:
    per_tile = block_size // rows if rows <= block_size else 1
    return tile_lists.n_tiles * per_tile, batch_heads


def _tune_key(q, k, lists: S2BlockLists, block_size: int) -> tuple:
    # Shape class: head dim, block, heads, GQA group, dtype, and the number of blocks rounded to a
    # power of two (the work per program grows with it).
    return (q.shape[-1], block_size, q.shape[2], q.shape[2] // k.shape[2], q.dtype,
            triton.next_power_of_2(lists.n_q_blocks), triton.next_power_of_2(lists.n_k_blocks))  # fmt: skip


def s2_attn_fwd(q, k, v, lists: S2BlockLists, block_size: int, scale: float, tiles=None, doc_start=None):
    """Launch the forward: `o` `[B, T, H, D]` in q's dtype and `lse` `[B, H, T]` fp32. `doc_start`:
    None, or `[B, Tq]` int32, each query's document start (global position)."""
    b, t_q, n_heads, d = q.shape
    t_k, n_kv = k.shape[1], k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty(b, n_heads, t_q, dtype=torch.float32, device=q.device)
    bd = head_dim_tile(d)
    doc_start, has_docs = doc_start_arg(q, doc_start)

    def launch(config: Config):
        bm, bn, warps, stages = config
        tl_fwd = lists.forward(max(1, bm // block_size))
        _s2_fwd_kernel[_grid(tl_fwd, block_size, bm, b * n_heads)](
            q, k, v, o, lse, lists.q_ids, lists.k_ids, lists.kid_stride, doc_start, *_tile_args(tl_fwd),
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            t_q, t_k, tl_fwd.n_tiles, n_heads, n_heads // n_kv, scale * LOG2E, *_pattern_args(lists),
            HEAD_DIM=d, BD=bd, BS=block_size, BM=bm, BN=bn, HAS_DOCS=has_docs,
            PRECISION=dot_precision(q.dtype), num_warps=warps, num_stages=stages,
        )  # fmt: skip

    _run_tuned("fwd", _tune_key(q, k, lists, block_size), launch, block_size, d, q.element_size(), tiles)
    return o, lse


def s2_attn_bwd(
    do, dlse, q, k, v, o, lse, lists: S2BlockLists, block_size: int, scale: float, tiles=None, doc_start=None
):
    """Launch the backward: `delta`, then dQ and dK/dV. `dlse` may be None (lse unused)."""
    b, t_q, n_heads, d = q.shape
    t_k, n_kv = k.shape[1], k.shape[2]
    group = n_heads // n_kv
    bd = head_dim_tile(d)
    precision = dot_precision(q.dtype)
    key = _tune_key(q, k, lists, block_size)
    doc_start, has_docs = doc_start_arg(q, doc_start)

    delta = torch.empty(b, n_heads, t_q, dtype=torch.float32, device=q.device)
    has_dlse = dlse is not None
    dlse = dlse.float().contiguous() if has_dlse else lse
    bm_pre = 64
    _s2_bwd_preprocess_kernel[(triton.cdiv(t_q, bm_pre), b * n_heads)](
        o, do, dlse, delta, *o.stride()[:3], *do.stride()[:3], t_q, n_heads,
        HEAD_DIM=d, BD=bd, BM=bm_pre, HAS_DLSE=has_dlse,
    )  # fmt: skip

    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)

    def launch_dq(config: Config):
        bm, bn, warps, stages = config
        tl_fwd = lists.forward(max(1, bm // block_size))
        _s2_bwd_dq_kernel[_grid(tl_fwd, block_size, bm, b * n_heads)](
            q, k, v, do, dq, lse, delta, lists.q_ids, lists.k_ids, lists.kid_stride, doc_start,
            *_tile_args(tl_fwd), *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
            *dq.stride()[:3],
            t_q, t_k, tl_fwd.n_tiles, n_heads, group, scale * LOG2E, scale, *_pattern_args(lists),
            HEAD_DIM=d, BD=bd, BS=block_size, BM=bm, BN=bn, HAS_DOCS=has_docs, PRECISION=precision,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip

    def launch_dkdv(config: Config):
        bn, bm, warps, stages = config
        tl_bwd = lists.backward(max(1, bn // block_size))
        _s2_bwd_dkdv_kernel[_grid(tl_bwd, block_size, bn, b * n_kv)](
            q, k, v, do, dk, dv, lse, delta, lists.q_ids, lists.k_ids, lists.kid_stride, doc_start,
            *_tile_args(tl_bwd),
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3],
            *dv.stride()[:3], t_q, t_k, tl_bwd.n_tiles, n_heads, n_kv, group, scale * LOG2E, scale,
            *_pattern_args(lists),
            HEAD_DIM=d, BD=bd, BS=block_size, BM=bm, BN=bn, HAS_DOCS=has_docs, PRECISION=precision,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip

    _run_tuned("dq", key, launch_dq, block_size, d, q.element_size(), tiles)
    _run_tuned("dkdv", key, launch_dkdv, block_size, d, q.element_size(), tiles)
    return dq, dk, dv


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class S2AttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lists, block_size, scale, tiles, doc_start):
        q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
        o, lse = s2_attn_fwd(q, k, v, lists, block_size, scale, tiles, doc_start)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.lists, ctx.block_size, ctx.scale, ctx.tiles = lists, block_size, scale, tiles
        ctx.doc_start = doc_start
        # An unused lse gets no gradient tensor rather than a tensor of zeros.
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv = s2_attn_bwd(
            _last_dim_contiguous(do), dlse, q, k, v, o, lse, ctx.lists, ctx.block_size, ctx.scale, ctx.tiles,
            ctx.doc_start,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None


def s2_attn_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    local_blocks: int,
    vert_stride: int,
    dense_heads: int,
    scale: float,
    q_block_ids=None,
    k_block_ids=None,
    tiles: tuple[int, int] | None = None,
    doc_start: torch.Tensor | None = None,
):
    """S2 attention through the Triton kernels; returns `(o, lse)`. Arguments as `s2_attn`; `doc_start`
    `[B, Tq]` int32: each query's document start (global position), or None.

    `tiles = (outer, inner)` fixes the tile rows instead of autotuning: the forward and dQ kernels
    take `outer` query rows and `inner` key rows, dK/dV `outer` key rows and `inner` query rows.
    """
    t_q, t_k = q.shape[1], k.shape[1]
    # One dtype for every tl.dot operand (a cast is a no-op when they already agree).
    k, v = k.to(q.dtype), v.to(q.dtype)
    q_ids = check_block_ids(q_block_ids, t_q, block_size, "q_block_ids")
    if k_block_ids is not None and torch.as_tensor(k_block_ids).dim() == 2:
        # A per-kv-head table: `k`, `v` are `[B, n * block_size, H_kv, D]` views of `[B, H_kv, n, bs, D]`.
        k_ids = check_block_table(k_block_ids, t_k // block_size)
    else:
        k_ids = check_block_ids(k_block_ids, t_k, block_size, "k_block_ids")
    lists = s2_block_lists(
        q.shape[2], q_ids, k_ids, local_blocks, vert_stride, dense_heads, q.device, block_size, t_q, t_k
    )
    return S2AttnFunction.apply(q, k, v, lists, block_size, scale, tiles, doc_start)
