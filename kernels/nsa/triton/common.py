"""Pieces shared by the NSA Triton kernels only: warps and dK/dV rows per tile, and the softmax
backward's row term. What every kernel shares (grouped rows, the online softmax, precision, head-dim
padding) is in `longctx.kernels.common.triton`.
"""

import torch
import triton
import triton.language as tl

from longctx.kernels.common.triton import LOG2E_C, head_dim_tile
from longctx.kernels.common.tuning import sm8x


def warps_for(head_dim_tile: int, rows: int = 128) -> int:
    """Warps for the attention tiles: with 128-wide heads and 64+ rows, 8 warps keep the tiles in
    registers without spills on sm_90 (checked with ptxas -v, 2 pipeline stages, bf16); smaller
    tiles fit in 4. 256-wide heads take 8 whatever the rows."""
    return 8 if (head_dim_tile > 64 and rows > 32) or head_dim_tile > 128 else 4


def cmp_rows(arch: int | None) -> int:
    """Rows (tokens x heads) per tile of the compressed forward and dQ: 128, and 64 on sm_8x (GQA
    group 4, hd 128, bf16: 128 rows spill 48 B in the forward and 88 B in dQ there; 64 rows: 172
    registers, none)."""
    return 64 if sm8x(arch) else 128


# Warps of the compressed kernels, at every head dim: with 64-wide heads 4 warps spill too (dQ 16 B on
# sm_90 and 48 B on sm_80, dK/dV 16 B on sm_80), 8 do not.
CMP_WARPS = 8


def select_blocks_warps(head_dim_tile: int, arch: int | None) -> int:
    """Warps of the block-selection kernel (64 rows): 4, and 8 for 256-wide heads and on sm_8x (GQA
    group 4, bf16: 4 warps spill 32 B at hd 64 and 40-48 B at hd 96/128 there, 8 none)."""
    return 8 if head_dim_tile > 128 or sm8x(arch) else 4


def dkdv_rows(head_dim_tile: int, arch: int | None = None) -> int:
    """Rows (tokens x heads) per step of the dK/dV kernels: 64, and 16 for head dims over 128, where
    the two fp32 [key block, 256] accumulators fill most of the register file (sm_90, bf16: the
    compressed dK/dV then spills 0-24 B instead of 96-136, the selected one 104-168 instead of
    176-216; its 64-key accumulators alone are 128 registers a thread). The compressed dK/dV passes
    its target `arch`: on sm_8x 32 rows (GQA group 4, hd 96, bf16: 64 rows spill 16 B at 255
    registers there, 32 rows use 177)."""
    if head_dim_tile > 128:
        return 16
    return 32 if sm8x(arch) else 64



@triton.jit
def load_row_terms(lse, delta, o_lse, m_r):
    """A backward's per-row terms at `o_lse` (`[B, H, T]` offsets): the lse in base 2 and
    `delta` (`softmax_delta`), 0 on masked rows."""
    b_lse2 = tl.load(lse + o_lse, mask=m_r, other=0.0) * LOG2E_C
    return b_lse2, tl.load(delta + o_lse, mask=m_r, other=0.0)

@triton.jit
def _softmax_delta_kernel(
    o,
    do,
    dlse,
    delta,
    T,
    N_ROWS,
    H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BR: tl.constexpr,
    BD: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    # Rows in [B, T, H] order (contiguous in o / do); delta is written as [B, H, T] like lse.
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    m_r = o_r < N_ROWS
    o_d = tl.arange(0, BD)
    o_rd = o_r.to(tl.int64)[:, None] * HEAD_DIM + o_d[None, :]
    m_rd = m_r[:, None] & (o_d < HEAD_DIM)[None, :]
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
        H=h, HEAD_DIM=d, BR=br, BD=head_dim_tile(d), HAS_DLSE=dlse is not None, num_warps=4,
    )  # fmt: skip
    return delta
