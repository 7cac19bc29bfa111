"""Triton kernels for NSA's compression branch: attention over compressed key/value tokens.

Query `t` (global position `q_offset + t`) sees compressed token `i` iff its block ends at or before
it: `i * cmp_stride + cmp_block - 1 <= q_offset + t`. A program owns `BT` query tokens x all `GROUP` query
heads of one kv group, so its `BT * GROUP` rows share every compressed K/V tile it loads (the same row
layout as the importance kernel in `select_blocks.py`). Forward returns `lse`; backward takes an lse
gradient too. dK/dV are owned by one program per (compressed-key tile, kv head) that walks every query
tile able to see it, so no atomics are needed.

Use it through `longctx.kernels.nsa_cmp_attn`.
"""

import torch
import triton
import triton.language as tl

from longctx.kernels.common.triton import (
    LOG2E,
    doc_start_arg,
    dot_precision,
    group_row_tile,
    group_rows,
    group_tile,
    head_dim_tile,
    lse_offset,
    softmax_finish,
    softmax_init,
    softmax_step,
)
from longctx.kernels.common.tuning import device_arch
from longctx.kernels.nsa.triton.common import CMP_WARPS, cmp_rows, dkdv_rows, load_row_terms, softmax_delta


@triton.jit
def _doc_rows(doc_start, i_b, i_tt, o_t, m_r, T, BT: tl.constexpr, BC: tl.constexpr, CMP_STRIDE: tl.constexpr,
              HAS_DOCS: tl.constexpr):  # fmt: skip
    """Each row's document start (global position) and the first compressed tile worth visiting: the
    tile's first query's document starts at or before every other row's, and compressed tokens whose
    block starts before a row's document are not visible to it."""
    b_dstart = tl.zeros(o_t.shape, dtype=tl.int32)
    c_first = 0
    if HAS_DOCS:
        b_dstart = tl.load(doc_start + i_b.to(tl.int64) * T + o_t, mask=m_r, other=0)
        ds_first = tl.load(doc_start + i_b.to(tl.int64) * T + i_tt * BT)
        c_first = (tl.cdiv(ds_first, CMP_STRIDE) // BC) * BC
    return b_dstart, c_first


@triton.jit
def _cmp_fwd_kernel(
    q,
    k,
    v,
    o,
    lse,
    scale_log2,
    T,
    TC,
    q_offset,
    doc_start,
    H: tl.constexpr,
    HKV: tl.constexpr,
    GROUP: tl.constexpr,
    BG: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CMP_BLOCK: tl.constexpr,
    CMP_STRIDE: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BD: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    i_tt, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    o_t, o_g, m_r = group_rows(i_tt, T, GROUP, BG, BT)
    b_pos = o_t + q_offset
    o_d = tl.arange(0, BD)
    m_d = o_d < HEAD_DIM
    o_rd, m_rd = group_row_tile(i_b, T, o_t, H, i_h, GROUP, o_g, m_r, HEAD_DIM, BD)
    b_q = tl.load(q + o_rd, mask=m_rd, other=0.0)
    kv_base = ((i_b * TC).to(tl.int64) * HKV + i_h) * HEAD_DIM
    o_cb = tl.arange(0, BC)
    # Offsets inside one compressed tile, hoisted out of the loop.
    o_cd = o_cb[:, None] * (HKV * HEAD_DIM) + o_d[None, :]

    # Compressed tokens visible to the tile's last query: those with i * stride + cmp_block - 1 <= pos.
    last_pos = tl.minimum(i_tt * BT + BT, T) - 1 + q_offset
    n_vis = tl.where(last_pos >= CMP_BLOCK - 1, (last_pos - CMP_BLOCK + 1) // CMP_STRIDE + 1, 0)
    n_vis = tl.minimum(n_vis, TC)
    b_dstart, c_first = _doc_rows(doc_start, i_b, i_tt, o_t, m_r, T, BT, BC, CMP_STRIDE, HAS_DOCS)

    b_acc, b_l, b_m = softmax_init(BT * BG, BD)
    for c0 in range(c_first, n_vis, BC):
        o_c = c0 + o_cb
        m_c = o_c < TC
        o_tile = kv_base + c0 * (HKV * HEAD_DIM)
        m_cd = m_c[:, None] & m_d[None, :]
        b_k = tl.load(k + o_tile + o_cd, mask=m_cd, other=0.0)
        b_v = tl.load(v + o_tile + o_cd, mask=m_cd, other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * scale_log2
        m_vis = m_c[None, :] & (o_c[None, :] * CMP_STRIDE + CMP_BLOCK - 1 <= b_pos[:, None])
        if HAS_DOCS:
            m_vis = m_vis & (o_c[None, :] * CMP_STRIDE >= b_dstart[:, None])
        b_s = tl.where(m_vis, b_s, float("-inf"))
        b_acc, b_l, b_m = softmax_step(b_acc, b_l, b_m, b_s, b_v, PRECISION)
    b_o, b_lse = softmax_finish(b_acc, b_l, b_m)
    tl.store(o + o_rd, b_o.to(o.dtype.element_ty), mask=m_rd)
    tl.store(lse + lse_offset(i_b, T, o_t, H, i_h, GROUP, o_g), b_lse, mask=m_r)


@triton.jit
def _cmp_bwd_dq_kernel(
    q,
    k,
    v,
    do,
    lse,
    delta,
    dq,
    scale,
    scale_log2,
    T,
    TC,
    q_offset,
    doc_start,
    H: tl.constexpr,
    HKV: tl.constexpr,
    GROUP: tl.constexpr,
    BG: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CMP_BLOCK: tl.constexpr,
    CMP_STRIDE: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BD: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    i_tt, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    o_t, o_g, m_r = group_rows(i_tt, T, GROUP, BG, BT)
    b_pos = o_t + q_offset
    o_d = tl.arange(0, BD)
    m_d = o_d < HEAD_DIM
    o_rd, m_rd = group_row_tile(i_b, T, o_t, H, i_h, GROUP, o_g, m_r, HEAD_DIM, BD)
    b_q = tl.load(q + o_rd, mask=m_rd, other=0.0)
    b_do = tl.load(do + o_rd, mask=m_rd, other=0.0)
    b_lse2, b_delta = load_row_terms(lse, delta, lse_offset(i_b, T, o_t, H, i_h, GROUP, o_g), m_r)
    kv_base = ((i_b * TC).to(tl.int64) * HKV + i_h) * HEAD_DIM
    o_cb = tl.arange(0, BC)
    # Offsets inside one compressed tile, hoisted out of the loop.
    o_cd = o_cb[:, None] * (HKV * HEAD_DIM) + o_d[None, :]

    last_pos = tl.minimum(i_tt * BT + BT, T) - 1 + q_offset
    n_vis = tl.where(last_pos >= CMP_BLOCK - 1, (last_pos - CMP_BLOCK + 1) // CMP_STRIDE + 1, 0)
    n_vis = tl.minimum(n_vis, TC)
    b_dstart, c_first = _doc_rows(doc_start, i_b, i_tt, o_t, m_r, T, BT, BC, CMP_STRIDE, HAS_DOCS)

    b_dq = tl.zeros([BT * BG, BD], dtype=tl.float32)
    for c0 in range(c_first, n_vis, BC):
        o_c = c0 + o_cb
        m_c = o_c < TC
        o_tile = kv_base + c0 * (HKV * HEAD_DIM)
        m_cd = m_c[:, None] & m_d[None, :]
        b_k = tl.load(k + o_tile + o_cd, mask=m_cd, other=0.0)
        b_v = tl.load(v + o_tile + o_cd, mask=m_cd, other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * scale_log2
        m_vis = m_r[:, None] & m_c[None, :] & (o_c[None, :] * CMP_STRIDE + CMP_BLOCK - 1 <= b_pos[:, None])
        if HAS_DOCS:
            m_vis = m_vis & (o_c[None, :] * CMP_STRIDE >= b_dstart[:, None])
        b_p = tl.where(m_vis, tl.exp2(b_s - b_lse2[:, None]), 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)
    tl.store(dq + o_rd, (b_dq * scale).to(dq.dtype.element_ty), mask=m_rd)


@triton.jit
def _cmp_bwd_dkdv_kernel(
    q,
    k,
    v,
    do,
    lse,
    delta,
    dk,
    dv,
    scale,
    scale_log2,
    T,
    TC,
    q_offset,
    doc_start,
    H: tl.constexpr,
    HKV: tl.constexpr,
    GROUP: tl.constexpr,
    BG: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CMP_BLOCK: tl.constexpr,
    CMP_STRIDE: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BD: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < TC
    o_d = tl.arange(0, BD)
    m_d = o_d < HEAD_DIM
    o_kv = ((i_b * TC).to(tl.int64) * HKV + i_h + o_c.to(tl.int64) * HKV) * HEAD_DIM
    m_cd = m_c[:, None] & m_d[None, :]
    b_k = tl.load(k + o_kv[:, None] + o_d[None, :], mask=m_cd, other=0.0)
    b_v = tl.load(v + o_kv[:, None] + o_d[None, :], mask=m_cd, other=0.0)
    b_dk = tl.zeros([BC, BD], dtype=tl.float32)
    b_dv = tl.zeros([BC, BD], dtype=tl.float32)

    # The first local query that sees the tile's first compressed token; earlier tiles see nothing.
    first = tl.maximum(i_c * BC * CMP_STRIDE + CMP_BLOCK - 1 - q_offset, 0)
    o_r = tl.arange(0, BT * BG)
    o_rt = o_r // BG
    o_g = o_r % BG
    for t0 in range((first // BT) * BT, T, BT):
        o_t = t0 + o_rt
        m_r = (o_t < T) & (o_g < GROUP)
        o_rd, m_rd = group_row_tile(i_b, T, o_t, H, i_h, GROUP, o_g, m_r, HEAD_DIM, BD)
        b_q = tl.load(q + o_rd, mask=m_rd, other=0.0)
        b_do = tl.load(do + o_rd, mask=m_rd, other=0.0)
        b_lse2, b_delta = load_row_terms(lse, delta, lse_offset(i_b, T, o_t, H, i_h, GROUP, o_g), m_r)
        b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION) * scale_log2  # [BC, BT * BG]
        m_vis = (
            m_c[:, None]
            & m_r[None, :]
            & (o_c[:, None] * CMP_STRIDE + CMP_BLOCK - 1 <= o_t[None, :] + q_offset)
        )
        if HAS_DOCS:
            b_dstart = tl.load(doc_start + i_b.to(tl.int64) * T + o_t, mask=m_r, other=0)
            m_vis = m_vis & (o_c[:, None] * CMP_STRIDE >= b_dstart[None, :])
        b_pt = tl.where(m_vis, tl.exp2(b_st - b_lse2[None, :]), 0.0)
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PRECISION)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PRECISION)
    tl.store(dk + o_kv[:, None] + o_d[None, :], (b_dk * scale).to(dk.dtype.element_ty), mask=m_cd)
    tl.store(dv + o_kv[:, None] + o_d[None, :], b_dv.to(dv.dtype.element_ty), mask=m_cd)


def cmp_attn_fwd(q, k_cmp, v_cmp, cmp_block, cmp_stride, scale, q_offset, doc_start=None):
    b, t, h, d = q.shape
    t_c, h_kv = k_cmp.shape[1], k_cmp.shape[2]
    bg, bt = group_tile(h // h_kv, cmp_rows(device_arch(q.device)))
    o = torch.empty_like(q)
    lse = torch.empty(b, h, t, device=q.device, dtype=torch.float32)
    if t_c == 0:
        return o.zero_(), lse.fill_(float("-inf"))
    bd = head_dim_tile(d)
    doc_start, has_docs = doc_start_arg(q, doc_start)
    _cmp_fwd_kernel[(triton.cdiv(t, bt), b * h_kv)](
        q, k_cmp, v_cmp, o, lse, scale * LOG2E, t, t_c, q_offset, doc_start,
        H=h, HKV=h_kv, GROUP=h // h_kv, BG=bg, HEAD_DIM=d, CMP_BLOCK=cmp_block, CMP_STRIDE=cmp_stride,
        BT=bt, BC=64, BD=bd, PRECISION=dot_precision(q.dtype), HAS_DOCS=has_docs,
        num_warps=CMP_WARPS, num_stages=2,
    )  # fmt: skip
    return o, lse


def cmp_attn_bwd(q, k_cmp, v_cmp, o, lse, do, dlse, cmp_block, cmp_stride, scale, q_offset, doc_start=None):
    b, t, h, d = q.shape
    t_c, h_kv = k_cmp.shape[1], k_cmp.shape[2]
    g = h // h_kv
    if t_c == 0:
        return torch.zeros_like(q), torch.zeros_like(k_cmp), torch.zeros_like(v_cmp)
    delta = softmax_delta(o, do, dlse)  # [B, H, T]
    bd = head_dim_tile(d)
    doc_start, has_docs = doc_start_arg(q, doc_start)
    common = dict(
        H=h, HKV=h_kv, GROUP=g, HEAD_DIM=d, CMP_BLOCK=cmp_block, CMP_STRIDE=cmp_stride, BD=bd,
        PRECISION=dot_precision(q.dtype), HAS_DOCS=has_docs,
    )  # fmt: skip
    dq = torch.empty_like(q)
    arch = device_arch(q.device)
    bg, bt = group_tile(g, cmp_rows(arch))
    # fp32 tiles and 256-wide heads are twice the bytes: a narrower compressed tile keeps the stages in
    # shared memory (hd 256 bf16 with 64 needs 256 KiB, over sm_90's 227 KiB).
    bc = 64 if q.element_size() <= 2 and bd <= 128 else 32
    _cmp_bwd_dq_kernel[(triton.cdiv(t, bt), b * h_kv)](
        q, k_cmp, v_cmp, do, lse, delta, dq, scale, scale * LOG2E, t, t_c, q_offset, doc_start,
        BG=bg, BT=bt, BC=bc, num_warps=CMP_WARPS, num_stages=2, **common,
    )  # fmt: skip
    dk, dv = torch.empty_like(k_cmp), torch.empty_like(v_cmp)
    bg, bt = group_tile(g, dkdv_rows(bd, arch))
    _cmp_bwd_dkdv_kernel[(triton.cdiv(t_c, 64), b * h_kv)](
        q, k_cmp, v_cmp, do, lse, delta, dk, dv, scale, scale * LOG2E, t, t_c, q_offset, doc_start,
        BG=bg, BT=bt, BC=64, num_warps=CMP_WARPS, num_stages=2, **common,
    )  # fmt: skip
    return dq, dk, dv


class CmpAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, cmp_block, cmp_stride, scale, q_offset, doc_start):
        q, k_cmp, v_cmp = (x.contiguous() for x in (q, k_cmp, v_cmp))
        o, lse = cmp_attn_fwd(q, k_cmp, v_cmp, cmp_block, cmp_stride, scale, q_offset, doc_start)
        ctx.save_for_backward(q, k_cmp, v_cmp, o, lse)
        ctx.args = (cmp_block, cmp_stride, scale, q_offset, doc_start)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k_cmp, v_cmp, o, lse = ctx.saved_tensors
        dq, dk, dv = cmp_attn_bwd(q, k_cmp, v_cmp, o, lse, do.contiguous(), dlse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def cmp_attn(q, k_cmp, v_cmp, cmp_block, cmp_stride, scale, q_offset=0, doc_start=None):
    """`(o, lse)` of the Triton compression attention, differentiable in q, k_cmp, v_cmp (and via lse).
    `doc_start` `[B, T]` int32: each query's document start; compressed tokens whose block starts
    before it are masked (a block that crosses a document boundary is seen by neither document)."""
    return CmpAttnFunction.apply(q, k_cmp, v_cmp, cmp_block, cmp_stride, scale, q_offset, doc_start)
