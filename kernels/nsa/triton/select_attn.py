"""Triton kernels for NSA's selection branch: causal attention over explicitly listed key blocks.

Every query token `t` of kv head `h` attends the key blocks listed in `block_idx[b, t, h]` (global
block indices, `-1` unused), causal inside its own block. All `GROUP = H / H_kv` query heads of a kv group
share the list, so one program takes the whole group as the M dimension of its matmuls and loads
each listed K/V block once for all of them (NSA's "group-centric" loading).

- forward / dq: one program per (`BT` consecutive tokens, kv head); its rows are the tokens x the
  group's heads (`BT = 1` when the group has 16 heads: the head group alone is the M dimension of
  `[rows, D] x [D, block]`). It walks the ascending union of its tokens' lists, loading each block
  once, masking the rows of tokens that did not list it and keys after each query (online softmax).
- dk / dv: the index lists are transposed on the GPU into, per (kv head, key block), the sorted list
  of query tokens that selected it (a stable sort by block, group bounds by binary search, no host
  sync). A program takes one chunk of at most `CHUNK` tokens of one block's list, streams `BT`
  tokens x `GROUP` heads of q / dO per step against the block's K/V held in registers, and sums its
  `[block, D]` dK/dV in fp32. Chunking bounds a program's work (block 0 and the local blocks are
  chosen by nearly every query). Deterministic, without atomics: a block's first chunk stores its
  rows of the fp32 dK/dV, each later chunk stores its own partial-sum slot (slots numbered per
  block in chunk order, by a prefix sum on the device), and `_select_bwd_dkdv_sum_kernel` (one
  program per block, once for dK and once for dV, its loop bounds read from device memory) adds
  them in chunk order. The slots
  take at most `B H_kv T n_sel / CHUNK` x `[block, D]` fp32 per buffer; with `CHUNK >= n_sel *
  block` (see `dkdv_chunk`) that is at most dK's and dV's own fp32 size, e.g. 2 x 128 MiB at
  T = 128k, H_kv = 2, D = 128.

Use it through `longctx.kernels.nsa_select_attn`.
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
    pow2_at_least_16,
    softmax_finish,
    softmax_init,
    softmax_step,
)
from longctx.kernels.nsa.triton.common import dkdv_rows, load_row_terms, softmax_delta, warps_for


@triton.jit
def _select_fwd_kernel(
    q,
    k,
    v,
    block_idx,
    o,
    lse,
    scale_log2,
    T,
    TK,
    q_offset,
    k_offset,
    doc_start,
    H: tl.constexpr,
    HKV: tl.constexpr,
    GROUP: tl.constexpr,
    BG: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    N_SEL: tl.constexpr,
    NSP: tl.constexpr,
    BS: tl.constexpr,
    BSP: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    i_tt, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    o_t, o_g, m_r = group_rows(i_tt, T, GROUP, BG, BT)
    b_pos = o_t + q_offset
    b_dstart = tl.zeros([BT * BG], dtype=tl.int32)
    if HAS_DOCS:
        # Each row's document start: the document's first selection block may hold earlier tokens.
        b_dstart = tl.load(doc_start + i_b.to(tl.int64) * T + o_t, mask=m_r, other=0)
    o_d = tl.arange(0, BD)
    m_d = o_d < HEAD_DIM
    o_s = tl.arange(0, BSP)
    o_rd, m_rd = group_row_tile(i_b, T, o_t, H, i_h, GROUP, o_g, m_r, HEAD_DIM, BD)
    b_q = tl.load(q + o_rd, mask=m_rd, other=0.0)
    kv_base = ((i_b * TK).to(tl.int64) * HKV + i_h) * HEAD_DIM
    # Offsets inside one key block, hoisted out of the loop: a step only adds the block's base.
    o_kd = o_s[:, None] * (HKV * HEAD_DIM) + o_d[None, :]

    # The tile's index lists [BT, NSP]; each list is ascending and duplicate-free (the launcher's
    # normalisation), unused slots become 2^31-1. The program walks the union of the lists in order.
    o_tt = i_tt * BT + tl.arange(0, BT)
    o_n = tl.arange(0, NSP)
    p_idx = block_idx + ((i_b * T + o_tt).to(tl.int64) * HKV + i_h)[:, None] * N_SEL + o_n[None, :]
    b_idx = tl.load(p_idx, mask=(o_tt < T)[:, None] & (o_n < N_SEL)[None, :], other=-1)
    b_idx = tl.where(b_idx < 0, 0x7FFFFFFF, b_idx)

    b_acc, b_l, b_m = softmax_init(BT * BG, BD)
    i_blk = tl.min(b_idx)
    while i_blk < 0x7FFFFFFF:
        # Rows whose token listed this block.
        b_listed = tl.max(tl.where(b_idx == i_blk, 1, 0), 1)  # [BT]
        m_listed = tl.reshape(tl.broadcast_to(b_listed[:, None], [BT, BG]), [BT * BG]) > 0
        k_lo = i_blk * BS - k_offset
        o_k = k_lo + o_s
        m_k = (o_s < BS) & (o_k >= 0) & (o_k < TK)
        o_blk = kv_base + k_lo.to(tl.int64) * (HKV * HEAD_DIM)
        m_kd = m_k[:, None] & m_d[None, :]
        b_k = tl.load(k + o_blk + o_kd, mask=m_kd, other=0.0)
        b_v = tl.load(v + o_blk + o_kd, mask=m_kd, other=0.0)
        m_s = (m_listed & m_r)[:, None] & m_k[None, :] & (o_k[None, :] + k_offset <= b_pos[:, None])
        if HAS_DOCS:
            m_s = m_s & (o_k[None, :] + k_offset >= b_dstart[:, None])
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * scale_log2  # [BT * BG, BSP], log2 units
        b_s = tl.where(m_s, b_s, float("-inf"))
        b_acc, b_l, b_m = softmax_step(b_acc, b_l, b_m, b_s, b_v, PRECISION)
        # The next block of the union: the smallest listed block above this one.
        i_blk = tl.min(tl.where(b_idx > i_blk, b_idx, 0x7FFFFFFF))
    b_o, b_lse = softmax_finish(b_acc, b_l, b_m)
    tl.store(o + o_rd, b_o.to(o.dtype.element_ty), mask=m_rd)
    tl.store(lse + lse_offset(i_b, T, o_t, H, i_h, GROUP, o_g), b_lse, mask=m_r)


@triton.jit
def _select_bwd_dq_kernel(
    q,
    k,
    v,
    block_idx,
    do,
    lse,
    delta,
    dq,
    scale,
    scale_log2,
    T,
    TK,
    q_offset,
    k_offset,
    doc_start,
    H: tl.constexpr,
    HKV: tl.constexpr,
    GROUP: tl.constexpr,
    BG: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    N_SEL: tl.constexpr,
    NSP: tl.constexpr,
    BS: tl.constexpr,
    BSP: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    i_tt, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    o_t, o_g, m_r = group_rows(i_tt, T, GROUP, BG, BT)
    b_pos = o_t + q_offset
    b_dstart = tl.zeros([BT * BG], dtype=tl.int32)
    if HAS_DOCS:
        # Each row's document start: the document's first selection block may hold earlier tokens.
        b_dstart = tl.load(doc_start + i_b.to(tl.int64) * T + o_t, mask=m_r, other=0)
    o_d = tl.arange(0, BD)
    m_d = o_d < HEAD_DIM
    o_s = tl.arange(0, BSP)
    o_rd, m_rd = group_row_tile(i_b, T, o_t, H, i_h, GROUP, o_g, m_r, HEAD_DIM, BD)
    b_q = tl.load(q + o_rd, mask=m_rd, other=0.0)
    b_do = tl.load(do + o_rd, mask=m_rd, other=0.0)
    b_lse2, b_delta = load_row_terms(lse, delta, lse_offset(i_b, T, o_t, H, i_h, GROUP, o_g), m_r)
    kv_base = ((i_b * TK).to(tl.int64) * HKV + i_h) * HEAD_DIM
    # Offsets inside one key block, hoisted out of the loop: a step only adds the block's base.
    o_kd = o_s[:, None] * (HKV * HEAD_DIM) + o_d[None, :]

    o_tt = i_tt * BT + tl.arange(0, BT)
    o_n = tl.arange(0, NSP)
    p_idx = block_idx + ((i_b * T + o_tt).to(tl.int64) * HKV + i_h)[:, None] * N_SEL + o_n[None, :]
    b_idx = tl.load(p_idx, mask=(o_tt < T)[:, None] & (o_n < N_SEL)[None, :], other=-1)
    b_idx = tl.where(b_idx < 0, 0x7FFFFFFF, b_idx)

    b_dq = tl.zeros([BT * BG, BD], dtype=tl.float32)
    i_blk = tl.min(b_idx)
    while i_blk < 0x7FFFFFFF:
        b_listed = tl.max(tl.where(b_idx == i_blk, 1, 0), 1)
        m_listed = tl.reshape(tl.broadcast_to(b_listed[:, None], [BT, BG]), [BT * BG]) > 0
        k_lo = i_blk * BS - k_offset
        o_k = k_lo + o_s
        m_k = (o_s < BS) & (o_k >= 0) & (o_k < TK)
        o_blk = kv_base + k_lo.to(tl.int64) * (HKV * HEAD_DIM)
        m_kd = m_k[:, None] & m_d[None, :]
        b_k = tl.load(k + o_blk + o_kd, mask=m_kd, other=0.0)
        b_v = tl.load(v + o_blk + o_kd, mask=m_kd, other=0.0)
        m_s = (m_listed & m_r)[:, None] & m_k[None, :] & (o_k[None, :] + k_offset <= b_pos[:, None])
        if HAS_DOCS:
            m_s = m_s & (o_k[None, :] + k_offset >= b_dstart[:, None])
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * scale_log2
        b_p = tl.where(m_s, tl.exp2(b_s - b_lse2[:, None]), 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)
        # The next block of the union: the smallest listed block above this one.
        i_blk = tl.min(tl.where(b_idx > i_blk, b_idx, 0x7FFFFFFF))
    tl.store(dq + o_rd, (b_dq * scale).to(dq.dtype.element_ty), mask=m_rd)


@triton.jit
def _select_bwd_dkdv_kernel(
    q,
    k,
    v,
    do,
    lse,
    delta,
    dk,
    dv,
    dk_part,
    dv_part,
    tokens,
    group_start,
    group_count,
    group_extra,
    item_group,
    item_chunk,
    scale,
    scale_log2,
    T,
    TK,
    q_offset,
    k_offset,
    doc_start,
    N_GROUPS,
    N_KBLK,
    H: tl.constexpr,
    HKV: tl.constexpr,
    GROUP: tl.constexpr,
    BG: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BS: tl.constexpr,
    BSP: tl.constexpr,
    BD: tl.constexpr,
    BT: tl.constexpr,
    CHUNK: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    i_item = tl.program_id(0)
    i_g = tl.load(item_group + i_item)
    # The grid is an upper bound on the number of work items (no host sync); extra programs exit.
    if i_g < N_GROUPS:
        i_chunk = tl.load(item_chunk + i_item)
        i_blk = i_g % N_KBLK
        i_bh = i_g // N_KBLK
        i_b, i_h = i_bh // HKV, i_bh % HKV
        n_tok = tl.load(group_count + i_g)
        i_lo = tl.load(group_start + i_g) + i_chunk * CHUNK
        i_hi = tl.load(group_start + i_g) + tl.minimum(n_tok, (i_chunk + 1) * CHUNK)

        o_s = tl.arange(0, BSP)
        o_d = tl.arange(0, BD)
        m_d = o_d < HEAD_DIM
        o_k = i_blk * BS - k_offset + o_s
        m_k = (o_s < BS) & (o_k >= 0) & (o_k < TK)
        o_kv = ((i_b * TK).to(tl.int64) * HKV + i_h + o_k.to(tl.int64) * HKV) * HEAD_DIM
        m_kd = m_k[:, None] & m_d[None, :]
        b_k = tl.load(k + o_kv[:, None] + o_d[None, :], mask=m_kd, other=0.0)
        b_v = tl.load(v + o_kv[:, None] + o_d[None, :], mask=m_kd, other=0.0)
        b_dk = tl.zeros([BSP, BD], dtype=tl.float32)
        b_dv = tl.zeros([BSP, BD], dtype=tl.float32)

        # Row r of a step is query token (r // BG) of the step and head (r % BG) of the group.
        o_r = tl.arange(0, BT * BG)
        o_rt = o_r // BG
        o_rg = o_r % BG
        for i_s in range(i_lo, i_hi, BT):
            m_r = (o_rg < GROUP) & (i_s + o_rt < i_hi)
            b_t = tl.load(tokens + i_s + o_rt, mask=m_r, other=0)
            o_rd, m_rd = group_row_tile(i_b, T, b_t, H, i_h, GROUP, o_rg, m_r, HEAD_DIM, BD)
            b_q = tl.load(q + o_rd, mask=m_rd, other=0.0)
            b_do = tl.load(do + o_rd, mask=m_rd, other=0.0)
            b_lse2, b_delta = load_row_terms(lse, delta, lse_offset(i_b, T, b_t, H, i_h, GROUP, o_rg), m_r)
            b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION) * scale_log2  # [BSP, BT * BG]
            m_st = m_k[:, None] & m_r[None, :] & (o_k[:, None] + k_offset <= b_t[None, :] + q_offset)
            if HAS_DOCS:
                b_dstart = tl.load(doc_start + i_b.to(tl.int64) * T + b_t, mask=m_r, other=0)
                m_st = m_st & (o_k[:, None] + k_offset >= b_dstart[None, :])
            b_pt = tl.where(m_st, tl.exp2(b_st - b_lse2[None, :]), 0.0)
            b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PRECISION)
            b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)
            b_dst = b_pt * (b_dpt - b_delta[None, :])
            b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PRECISION)
        # The block's first chunk owns its dK/dV rows; later chunks write their own partial slot,
        # which `_select_bwd_dkdv_sum_kernel` adds in chunk order: no atomics, a fixed order.
        if i_chunk == 0:
            tl.store(dk + o_kv[:, None] + o_d[None, :], b_dk * scale, mask=m_kd)
            tl.store(dv + o_kv[:, None] + o_d[None, :], b_dv, mask=m_kd)
        else:
            i_slot = tl.load(group_extra + i_g) + i_chunk - 1
            o_p = i_slot.to(tl.int64) * (BS * HEAD_DIM) + o_s[:, None] * HEAD_DIM + o_d[None, :]
            m_p = (o_s < BS)[:, None] & m_d[None, :]
            tl.store(dk_part + o_p, b_dk * scale, mask=m_p)
            tl.store(dv_part + o_p, b_dv, mask=m_p)


@triton.jit
def _select_bwd_dkdv_sum_kernel(
    dx,
    dx_part,
    group_extra,
    TK,
    k_offset,
    N_KBLK,
    HKV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BS: tl.constexpr,
    BSP: tl.constexpr,
    BD: tl.constexpr,
):
    """Grid `[B * H_kv * N_KBLK]`, run once for dK and once for dV: one program per key block adds
    the partial sums of the block's chunks after the first (slots `group_extra[g] ..
    group_extra[g + 1]`, consecutive in chunk order) to the rows the first chunk wrote, in fp32. The
    loop bounds come from device memory."""
    i_g = tl.program_id(0)
    i_lo = tl.load(group_extra + i_g)
    i_hi = tl.load(group_extra + i_g + 1)
    if i_hi > i_lo:
        i_blk = i_g % N_KBLK
        i_bh = i_g // N_KBLK
        i_b, i_h = i_bh // HKV, i_bh % HKV
        o_s = tl.arange(0, BSP)
        o_d = tl.arange(0, BD)
        m_d = o_d < HEAD_DIM
        o_k = i_blk * BS - k_offset + o_s
        m_k = (o_s < BS) & (o_k >= 0) & (o_k < TK)
        o_kv = ((i_b * TK).to(tl.int64) * HKV + i_h + o_k.to(tl.int64) * HKV) * HEAD_DIM
        m_kd = m_k[:, None] & m_d[None, :]
        b_dx = tl.load(dx + o_kv[:, None] + o_d[None, :], mask=m_kd, other=0.0)
        o_p = i_lo.to(tl.int64) * (BS * HEAD_DIM) + o_s[:, None] * HEAD_DIM + o_d[None, :]
        m_p = (o_s < BS)[:, None] & m_d[None, :]
        for _ in range(i_lo, i_hi):
            b_dx += tl.load(dx_part + o_p, mask=m_p, other=0.0)
            o_p += BS * HEAD_DIM
        tl.store(dx + o_kv[:, None] + o_d[None, :], b_dx, mask=m_kd)


# Rows (query tokens x heads of a kv group) per forward / dq program. 16 = one token when GROUP = 16: the
# head group alone is the M dimension. More rows make consecutive tokens share each loaded block
# (the program walks the union of their lists): less K/V traffic, more masked work when the tokens'
# choices differ. A tuning knob (`bench/nsa.py --select-rows`).
SELECT_ROWS = 16
# Query tokens per dk/dv work item: bounds one program's work on popular blocks (block 0, local ones).
DKDV_CHUNK = 256


def dkdv_chunk(bt: int, n_sel: int, block_size: int) -> int:
    """Query tokens per dk/dv work item. At least `n_sel * block_size`: a block's chunks after its first
    write `[block_size, D]` fp32 partial sums, at most `B H_kv T n_sel / chunk` of them, so the partial
    buffers stay within the size of dK and dV in fp32."""
    return max(bt, DKDV_CHUNK, n_sel * block_size)


def normalize_block_idx(block_idx: torch.Tensor, block_size: int, t_k: int, q_offset: int, k_offset: int):
    """Sort each index list ascending and blank (-1, moved last) duplicates, blocks after the query and
    blocks holding none of the keys `[k_offset, k_offset + t_k)`: every remaining entry is real work."""
    t = block_idx.shape[1]
    idx = block_idx.to(torch.int32)
    q_pos = torch.arange(t, device=idx.device, dtype=torch.int32).view(1, t, 1, 1) + q_offset
    start = idx * block_size
    keep = (idx >= 0) & (start <= q_pos) & (start + block_size > k_offset) & (start < k_offset + t_k)
    big = torch.iinfo(torch.int32).max
    idx = torch.where(keep, idx, big).sort(dim=-1).values
    dup = torch.zeros_like(keep)
    dup[..., 1:] = idx[..., 1:] == idx[..., :-1]
    idx = torch.where(dup, big, idx).sort(dim=-1).values
    return torch.where(idx == big, -1, idx).contiguous()


def select_attn_fwd(q, k, v, block_idx, block_size, scale, q_offset, k_offset, doc_start=None):
    """Launch the forward. `block_idx` must come from `normalize_block_idx`. Returns `(o, lse)`."""
    b, t, h, d = q.shape
    t_k, h_kv = k.shape[1], k.shape[2]
    g = h // h_kv
    o = torch.empty_like(q)
    lse = torch.empty(b, h, t, device=q.device, dtype=torch.float32)
    n_sel = block_idx.shape[-1]
    bd = head_dim_tile(d)
    bg, bt = group_tile(g, SELECT_ROWS)
    _select_fwd_kernel[(triton.cdiv(t, bt), b * h_kv)](
        q, k, v, block_idx, o, lse, scale * LOG2E, t, t_k, q_offset, k_offset, doc_start_arg(q, doc_start)[0],
        HAS_DOCS=doc_start is not None,
        H=h, HKV=h_kv, GROUP=g, BG=bg, HEAD_DIM=d, N_SEL=n_sel, NSP=triton.next_power_of_2(n_sel),
        BS=block_size, BSP=pow2_at_least_16(block_size), BT=bt, BD=bd, PRECISION=dot_precision(q.dtype),
        num_warps=warps_for(bd, bt * bg), num_stages=2,
    )  # fmt: skip
    return o, lse


def transpose_block_idx(block_idx: torch.Tensor, n_kblk: int, t_k: int, chunk: int):
    """Per (batch, kv head, key block) group, the ascending query tokens that listed it, as CSR, and
    the work items (group, chunk) of at most `chunk` tokens, and each group's first partial-sum slot
    (`[n_groups + 1]`, exclusive prefix of its chunk count less one). All on the device, without a
    host sync: the item list has a fixed upper-bound length and its unused tail names group
    `n_groups`."""
    b, t, h_kv, n = block_idx.shape
    n_groups = b * h_kv * n_kblk
    dev = block_idx.device
    idx = block_idx.permute(0, 2, 1, 3)  # [B, H_kv, T, n]
    bh = torch.arange(b * h_kv, device=dev, dtype=torch.int32).view(b, h_kv, 1, 1)
    group = torch.where(idx >= 0, bh * n_kblk + idx, n_groups).flatten()  # int32: a cheaper radix sort
    # A stable sort keeps tokens ascending inside each group (they are ascending in the input).
    group_sorted, order = torch.sort(group, stable=True)
    tokens = (order // n % t).to(torch.int32)
    # Group boundaries by binary search in the sorted list (bincount syncs with the host on CUDA).
    bounds = torch.searchsorted(group_sorted, torch.arange(n_groups + 1, device=dev, dtype=torch.int32))
    starts = bounds[:-1]
    counts = bounds[1:] - starts
    n_chunks = (counts + chunk - 1) // chunk
    chunk_end = torch.cumsum(n_chunks, 0)
    n_items = b * h_kv * t * n // chunk + n_groups + 1
    item = torch.arange(n_items, device=dev)
    item_group = torch.searchsorted(chunk_end, item, right=True)
    # Items past the last real one get group n_groups (the kernel skips them); clamp to index safely.
    last = item_group.clamp(max=n_groups - 1)
    item_chunk = item - (chunk_end[last] - n_chunks[last])
    # Partial-sum slots of each group's chunks after the first, consecutive in chunk order:
    # group g owns slots [extra[g], extra[g + 1]). At most (B H_kv T n) // chunk of them in all.
    extra = torch.zeros(n_groups + 1, device=dev, dtype=torch.int64)
    extra[1:] = torch.cumsum((n_chunks - 1).clamp(min=0), 0)
    return (
        tokens,
        starts.to(torch.int32),
        counts.to(torch.int32),
        extra.to(torch.int32),
        item_group.to(torch.int32),
        item_chunk.to(torch.int32),
        n_groups,
    )


def select_attn_bwd(
    q, k, v, block_idx, o, lse, do, dlse, block_size, scale, q_offset, k_offset, doc_start=None
):
    """Launch the backward kernels. Returns `(dq, dk, dv)`."""
    b, t, h, d = q.shape
    t_k, h_kv = k.shape[1], k.shape[2]
    g = h // h_kv
    delta = softmax_delta(o, do, dlse)  # [B, H, T]
    bd, bsp = head_dim_tile(d), pow2_at_least_16(block_size)
    n_sel = block_idx.shape[-1]
    bg, bt = group_tile(g, SELECT_ROWS)
    dq = torch.empty_like(q)
    _select_bwd_dq_kernel[(triton.cdiv(t, bt), b * h_kv)](
        q, k, v, block_idx, do, lse, delta, dq, scale, scale * LOG2E, t, t_k, q_offset, k_offset,
        doc_start_arg(q, doc_start)[0], HAS_DOCS=doc_start is not None,
        H=h, HKV=h_kv, GROUP=g, BG=bg, HEAD_DIM=d, N_SEL=n_sel, NSP=triton.next_power_of_2(n_sel),
        BS=block_size, BSP=bsp, BT=bt, BD=bd, PRECISION=dot_precision(q.dtype),
        num_warps=warps_for(bd, bt * bg), num_stages=2,
    )  # fmt: skip

    n_kblk = (k_offset + t_k + block_size - 1) // block_size
    # Tokens per step so a step's rows (tokens x heads of the group) fill a 64-row matmul operand.
    bg, bt = group_tile(g, dkdv_rows(bd))
    chunk = dkdv_chunk(bt, n_sel, block_size)
    tokens, starts, counts, extra, item_group, item_chunk, n_groups = transpose_block_idx(
        block_idx, n_kblk, t_k, chunk
    )
    # Blocks no query listed keep zero rows; every other row is stored by its block's first chunk.
    dk = torch.zeros(b, t_k, h_kv, d, device=q.device, dtype=torch.float32)
    dv = torch.zeros_like(dk)
    n_slots = max(1, b * h_kv * t * n_sel // chunk)
    dk_part = torch.empty(n_slots, block_size, d, device=q.device, dtype=torch.float32)
    dv_part = torch.empty_like(dk_part)
    _select_bwd_dkdv_kernel[(item_group.numel(),)](
        q, k, v, do, lse, delta, dk, dv, dk_part, dv_part, tokens, starts, counts, extra, item_group,
        item_chunk, scale, scale * LOG2E, t, t_k, q_offset, k_offset, doc_start_arg(q, doc_start)[0],
        n_groups, n_kblk, HAS_DOCS=doc_start is not None,
        H=h, HKV=h_kv, GROUP=g, BG=bg, HEAD_DIM=d, BS=block_size, BSP=bsp, BD=bd, BT=bt, CHUNK=chunk,
        PRECISION=dot_precision(q.dtype), num_warps=warps_for(bd, bt * bg), num_stages=2,
    )  # fmt: skip
    # One [block, D] fp32 accumulator per program: dK and dV together spilled 120 B on sm_80 at hd 128.
    for dx, dx_part in ((dk, dk_part), (dv, dv_part)):
        _select_bwd_dkdv_sum_kernel[(n_groups,)](
            dx, dx_part, extra, t_k, k_offset, n_kblk,
            HKV=h_kv, HEAD_DIM=d, BS=block_size, BSP=bsp, BD=bd, num_warps=8, num_stages=1,
        )  # fmt: skip
    return dq, dk.to(k.dtype), dv.to(v.dtype)


class SelectAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_idx, block_size, scale, q_offset, k_offset, doc_start):
        q, k, v = (x.contiguous() for x in (q, k, v))
        idx = normalize_block_idx(block_idx, block_size, k.shape[1], q_offset, k_offset)
        o, lse = select_attn_fwd(q, k, v, idx, block_size, scale, q_offset, k_offset, doc_start)
        ctx.save_for_backward(q, k, v, idx, o, lse)
        ctx.args = (block_size, scale, q_offset, k_offset, doc_start)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, idx, o, lse = ctx.saved_tensors
        dq, dk, dv = select_attn_bwd(q, k, v, idx, o, lse, do.contiguous(), dlse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


def select_attn(q, k, v, block_idx, block_size, scale, q_offset=0, k_offset=0, doc_start=None):
    """`(o, lse)` of the Triton selection attention, differentiable in q, k, v. `doc_start` `[B, T]`
    int32: each query's document start (global); keys before it are masked in every listed block."""
    return SelectAttnFunction.apply(q, k, v, block_idx, block_size, scale, q_offset, k_offset, doc_start)
