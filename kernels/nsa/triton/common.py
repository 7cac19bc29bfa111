"""Pieces shared by the NSA Triton kernels: tile shapes and the softmax backward's row term.

The NSA kernels lay a program's rows out as query tokens x the query heads of one kv group
(row `r` = token `r // GP`, head `r % GP`), so every K/V tile a program loads serves the whole group.
"""

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def pow2_at_least_16(x: int) -> int:
    """Power-of-two tile extent covering `x`, at least 16 (the smallest `tl.dot` operand on GPUs)."""
    return max(16, triton.next_power_of_2(x))


def row_tile(n_heads_group: int, rows: int) -> tuple[int, int]:
    """`(GP, BT)`: the group's heads padded to a power of two, and the tokens per tile, so that a tile
    has about `rows` rows and at least 16."""
    gp = triton.next_power_of_2(n_heads_group)
    return gp, max(1, max(rows, 16) // gp)


def warps_for(head_dim_tile: int, rows: int = 128) -> int:
    """Warps for the attention tiles: with 128-wide heads and 64+ rows, 8 warps keep the tiles in
    registers without spills on sm_90 (checked with ptxas -v, 2 pipeline stages, bf16); smaller
    tiles fit in 4. 256-wide heads take 8 whatever the rows."""
    return 8 if (head_dim_tile > 64 and rows > 32) or head_dim_tile > 128 else 4


def dkdv_rows(head_dim_tile: int) -> int:
    """Rows (tokens x heads) per step of the dK/dV kernels: 64, and 16 for head dims over 128, where
    the two fp32 [key block, 256] accumulators fill most of the register file (sm_90, bf16: the
    compressed dK/dV then spills 0-24 B instead of 96-136, the selected one 104-168 instead of
    176-216; its 64-key accumulators alone are 128 registers a thread)."""
    return 64 if head_dim_tile <= 128 else 16


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact ("ieee") for fp32 inputs, so fp32 on a GPU matches the fp32
    reference (the block choice compares importances); the default tf32 otherwise, where it only
    names the default (bf16 / fp16 operands are multiplied exactly)."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def row_offset(i_b, T, o_t, H, i_h, G, o_g, D):
    """Element offset of (batch `i_b`, token `o_t`, query head `i_h * G + o_g`) in a `[B, T, H, D]`
    tensor, in int64 from the token on (`T * H * D` passes 2^31 at 1M tokens, 32 heads of 128)."""
    return ((i_b * T + o_t).to(tl.int64) * H + i_h * G + o_g) * D


@triton.jit
def _softmax_delta_kernel(
    o,
    do,
    dlse,
    delta,
    T,
    N_ROWS,
    H: tl.constexpr,
    D: tl.constexpr,
    BR: tl.constexpr,
    BD: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    # Rows in [B, T, H] order (contiguous in o / do); delta is written as [B, H, T] like lse.
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    m_r = o_r < N_ROWS
    o_d = tl.arange(0, BD)
    o_rd = o_r.to(tl.int64)[:, None] * D + o_d[None, :]
    m_rd = m_r[:, None] & (o_d < D)[None, :]
    b_o = tl.load(o + o_rd, mask=m_rd, other=0.0).to(tl.float32)
    b_do = tl.load(do + o_rd, mask=m_rd, other=0.0).to(tl.float32)
    b_delta = tl.sum(b_o * b_do, 1)
    o_bh = o_r // (T * H) * H + o_r % H
    o_out = o_bh.to(tl.int64) * T + (o_r // H) % T
    if HAS_DLSE:
        b_delta -= tl.load(dlse + o_out, mask=m_r, other=0.0)
    tl.store(delta + o_out, b_delta, mask=m_r)


def softmax_delta(o: torch.Tensor, do: torch.Tensor, dlse: torch.Tensor | None) -> torch.Tensor:
    """`rowsum(dO * O) - dlse` in fp32, `[B, H, T]`: the softmax backward's per-row term with the
    lse gradient folded in (`dS = P * (dP - delta)`). One pass over o and dO, no fp32 copies."""
    b, t, h, d = o.shape
    delta = torch.empty(b, h, t, device=o.device, dtype=torch.float32)
    n_rows = b * t * h
    br = 64
    _softmax_delta_kernel[(triton.cdiv(n_rows, br),)](
        o, do, dlse.float().contiguous() if dlse is not None else delta, delta, t, n_rows,
        H=h, D=d, BR=br, BD=pow2_at_least_16(d), HAS_DLSE=dlse is not None, num_warps=4,
    )  # fmt: skip
    return delta
