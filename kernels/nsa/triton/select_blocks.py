"""Triton kernel for NSA's block choice: importance of each selection block and the top-k per query.

Importance of selection block `j` for query `t` and kv group `h` is the compression branch's attention
probability `exp(q . k_cmp * scale - lse)` summed over the query heads of the group and over the
compressed tokens whose blocks overlap block `j`. With `R = slc_block / cmp_stride` and
`M = cmp_block / cmp_stride`, compressed token `i` overlaps block `j` iff `jR - M + 1 <= i <= jR + R - 1`:
the `R` tokens of "group" `j` plus the last `M - 1` tokens of group `j - 1`.

One program owns `BT` query tokens x the `GROUP` heads of one kv group (rows = tokens x heads, as in the
compression attention). It walks the selection blocks up to its last query's block, `NJ` blocks
(`NJ * R` compressed tokens) per step:

1. `p = exp2(q k^T - lse)` `[BT * GROUP, NJ * R]`, causal by compressed-block end; summed over heads;
2. per-group sums and per-group suffix sums (the last `M - 1` tokens) by reshapes; each block adds the
   previous group's suffix (shifted by one block, the step's first block takes a carry from the last
   step), giving `[BT, NJ]` importances in registers;
3. the step's candidates are packed into sortable int64 keys `(importance bits << 32) | (2^31-1-j)`
   (non-negative fp32 bits order like the floats; equal importance puts the lower block first), block 0
   and the two local blocks get +inf, future blocks are dropped, and a running top-`NJ` list per token
   is merged with them by `tl.topk` over the concatenation.

At the end the first `slc_top` keys are decoded, sorted ascending, and written; nothing of size
`T x T / cmp_stride` or `T x n_blocks` is ever stored: the memory is the `[B, T, H_kv, slc_top]` output.
Requires `R` to be a power of two and `M - 1 <= R` (DESIGN's defaults: R = 4, M = 2); the public op
falls back to the reference otherwise.

Use it through `longctx.kernels.nsa_select_blocks`.
"""

import torch
import triton
import triton.language as tl

from longctx.kernels.common.triton import (
    LOG2E,
    LOG2E_C,
    dot_precision,
    group_row_tile,
    group_rows,
    group_tile,
    head_dim_tile,
    lse_offset,
)
from longctx.kernels.common.tuning import device_arch
from longctx.kernels.nsa.triton.common import select_blocks_warps


@triton.jit
def _select_blocks_kernel(
    q,
    k,
    lse,
    out,
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
    SLC_BLOCK: tl.constexpr,
    TOP: tl.constexpr,
    NJ: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    R: tl.constexpr = SLC_BLOCK // CMP_STRIDE
    HALO: tl.constexpr = CMP_BLOCK // CMP_STRIDE - 1
    BC: tl.constexpr = NJ * R
    i_tt, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HKV, i_bh % HKV

    o_t, o_g, m_r = group_rows(i_tt, T, GROUP, BG, BT)
    b_pos = o_t + q_offset
    o_d = tl.arange(0, BD)
    m_d = o_d < HEAD_DIM
    o_rd, m_rd = group_row_tile(i_b, T, o_t, H, i_h, GROUP, o_g, m_r, HEAD_DIM, BD)
    b_q = tl.load(q + o_rd, mask=m_rd, other=0.0)
    b_lse2 = tl.load(lse + lse_offset(i_b, T, o_t, H, i_h, GROUP, o_g), mask=m_r, other=0.0) * LOG2E_C
    k_base = ((i_b * TC).to(tl.int64) * HKV + i_h) * HEAD_DIM

    # Per token of the tile: its selection block, and the first block of its document (block 0
    # without documents); with documents, row r's document start.
    o_tt = i_tt * BT + tl.arange(0, BT)
    b_qblk = (o_tt + q_offset) // SLC_BLOCK  # [BT]
    last_blk = (tl.minimum(i_tt * BT + BT, T) - 1 + q_offset) // SLC_BLOCK
    b_dblk = tl.zeros([BT], dtype=tl.int32)
    b_dstart = tl.zeros([BT * BG], dtype=tl.int32)
    j_first = 0
    if HAS_DOCS:
        p_ds = doc_start + i_b.to(tl.int64) * T
        b_dblk = tl.load(p_ds + o_tt, mask=o_tt < T, other=0) // SLC_BLOCK
        b_dstart = tl.load(p_ds + o_t, mask=m_r, other=0)
        # Blocks before the tile's first document hold no visible compressed token (nor does the
        # group before them, whose suffix the skipped carry would have held): start there.
        j_first = (tl.load(p_ds + i_tt * BT) // SLC_BLOCK // NJ) * NJ

    o_j = tl.arange(0, NJ)
    o_cb = tl.arange(0, BC)
    o_cd = o_cb[:, None] * (HKV * HEAD_DIM) + o_d[None, :]
    m_suffix = (o_cb % R) >= R - HALO
    b_top = tl.full([BT, NJ], -1, dtype=tl.int64)
    b_carry = tl.zeros([BT], dtype=tl.float32)
    for j0 in range(j_first, last_blk + 1, NJ):
        o_c = j0 * R + o_cb
        m_c = o_c < TC
        p_k = k + k_base + j0 * (R * HKV * HEAD_DIM) + o_cd
        b_k = tl.load(p_k, mask=m_c[:, None] & m_d[None, :], other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * scale_log2  # [BT * BG, BC]
        m_vis = m_r[:, None] & m_c[None, :] & (o_c[None, :] * CMP_STRIDE + CMP_BLOCK - 1 <= b_pos[:, None])
        if HAS_DOCS:
            m_vis = m_vis & (o_c[None, :] * CMP_STRIDE >= b_dstart[:, None])
        b_p = tl.where(m_vis, tl.exp2(b_s - b_lse2[:, None]), 0.0)
        b_p = tl.sum(tl.reshape(b_p, [BT, BG, BC]), 1)  # [BT, BC], summed over the group's heads
        b_own = tl.sum(tl.reshape(b_p, [BT, NJ, R]), 2)  # [BT, NJ]
        b_suffix = tl.sum(tl.reshape(tl.where(m_suffix[None, :], b_p, 0.0), [BT, NJ, R]), 2)
        # Block j also holds the suffix of group j - 1: shift by one; the first takes the carry.
        b_prev = tl.sum(tl.where(o_j[:, None] == o_j[None, :] - 1, b_suffix[:, :, None], 0.0), 1)
        b_prev = tl.where(o_j[None, :] == 0, b_carry[:, None], b_prev)
        b_carry = tl.sum(tl.where(o_j[None, :] == NJ - 1, b_suffix, 0.0), 1)
        b_imp = b_own + b_prev

        o_blk = j0 + o_j
        b_bits = b_imp.to(tl.int32, bitcast=True).to(tl.int64)
        m_forced = (
            (o_blk[None, :] == b_dblk[:, None])
            | (o_blk[None, :] == b_qblk[:, None])
            | (o_blk[None, :] == b_qblk[:, None] - 1)
        )
        b_bits = tl.where(m_forced, 0x7F800000, b_bits)
        b_key = (b_bits << 32) | (0x7FFFFFFF - o_blk).to(tl.int64)[None, :]
        m_cand = (o_blk[None, :] <= b_qblk[:, None]) & (o_blk[None, :] >= b_dblk[:, None])
        b_key = tl.where(m_cand, b_key, -1)
        b_top = tl.topk(tl.reshape(tl.join(b_top, b_key), [BT, 2 * NJ]), NJ)

    # b_top is sorted by importance, best first: keep the first TOP, list them in ascending order.
    m_keep = (o_j[None, :] < TOP) & (b_top >= 0)
    b_blk = (0x7FFFFFFF - (b_top & 0x7FFFFFFF)).to(tl.int32)  # the low word is 2^31-1-j
    b_blk = tl.sort(tl.where(m_keep, b_blk, 0x7FFFFFFF))
    b_blk = tl.where(b_blk == 0x7FFFFFFF, -1, b_blk)
    o_out = ((i_b * T + o_tt).to(tl.int64) * HKV + i_h) * TOP
    tl.store(out + o_out[:, None] + o_j[None, :], b_blk, mask=(o_tt < T)[:, None] & (o_j[None, :] < TOP))


def supported(cmp_block: int, cmp_stride: int, slc_block: int) -> bool:
    """Block geometries the kernel handles: power-of-two `slc_block / cmp_stride`, and a compression
    block that spills into at most the previous selection block."""
    r = slc_block // cmp_stride
    return (
        slc_block % cmp_stride == 0
        and cmp_block % cmp_stride == 0
        and r & (r - 1) == 0
        and (cmp_block // cmp_stride - 1 <= r)
    )


def select_blocks(
    q, k_cmp, lse_cmp, cmp_block, cmp_stride, slc_block, slc_top, scale, q_offset=0, doc_start=None
):
    """Launch the kernel. Returns `[B, T, H_kv, slc_top]` int32 block indices, ascending, -1 last.
    `doc_start` `[B, T]` int32: each query's document start (global), or None."""
    b, t, h, d = q.shape
    t_c, h_kv = k_cmp.shape[1], k_cmp.shape[2]
    g = h // h_kv
    q, k_cmp, lse_cmp = q.contiguous(), k_cmp.to(q.dtype).contiguous(), lse_cmp.float().contiguous()
    r = slc_block // cmp_stride
    # Blocks per step: at least the top-k width (the running list has the same width) and enough
    # compressed tokens (NJ * R >= 16) for a matmul operand.
    nj = max(triton.next_power_of_2(slc_top), triton.next_power_of_2(triton.cdiv(16, r)))
    bg, bt = group_tile(g, 64)
    out = torch.empty(b, t, h_kv, slc_top, device=q.device, dtype=torch.int32)
    bd = head_dim_tile(d)
    _select_blocks_kernel[(triton.cdiv(t, bt), b * h_kv)](
        q, k_cmp, lse_cmp, out, scale * LOG2E, t, t_c, q_offset,
        out if doc_start is None else doc_start.to(torch.int32).contiguous(),
        HAS_DOCS=doc_start is not None,
        H=h, HKV=h_kv, GROUP=g, BG=bg, HEAD_DIM=d, CMP_BLOCK=cmp_block, CMP_STRIDE=cmp_stride,
        SLC_BLOCK=slc_block, TOP=slc_top, NJ=nj, BT=bt, BD=bd, PRECISION=dot_precision(q.dtype),
        num_warps=select_blocks_warps(bd, device_arch(q.device)), num_stages=2,
    )  # fmt: skip
    return out
