"""Pieces every Triton kernel shares: constants, the `tl.dot` precision, head-dim padding, the online
softmax step and its `(o, lse)` finish, and the grouped-row (GQA) layout.

Imported only by the kernel modules (`<op>/triton.py`, `<op>/chunk.py`, `nsa/triton/*`), which are
themselves imported on first use, so `@triton.jit` here follows the same `TRITON_INTERPRET` setting.
The `@triton.jit` helpers are called from other kernels and inlined there; they use nothing newer
than Triton 3.6.

Softmax kernels work in base 2: scores are `q . k * scale * LOG2E`, so `exp2` replaces `exp`; the
running max `m` and sum `l` are base-2, and the stored lse is natural-log (`(m + log2 l) * LN2`).

    b_acc, b_l, b_m = softmax_init(BM, BD)
    for ...:                                       # over key tiles
        b_s = tl.where(m_visible, tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale, -inf)
        b_acc, b_l, b_m = softmax_step(b_acc, b_l, b_m, b_s, b_v, PRECISION)
    b_o, b_lse = softmax_finish(b_acc, b_l, b_m)  # rows that saw no key: o = 0, lse = -inf
"""

import torch
import triton
import triton.language as tl

# log2(e) and ln(2): host code scales logits by `scale * LOG2E`; kernels read the `tl.constexpr`
# copies (a `@triton.jit` function may only read globals that are constexpr).
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)


def dot_precision(dtype: torch.dtype) -> str:
    """`PRECISION` for `tl.dot`: exact ("ieee") for fp32 inputs, so fp32 on a GPU matches the fp32
    reference (NSA's block choice compares importances); "tf32" otherwise, where it only names the
    default (bf16 / fp16 operands are multiplied exactly)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def pow2_at_least_16(x: int) -> int:
    """Power-of-two tile extent covering `x`, at least 16 (the smallest `tl.dot` operand on GPUs)."""
    return max(16, triton.next_power_of_2(x))


def head_dim_tile(head_dim: int) -> int:
    """`BD`: the head dim padded to the tile the kernels load (masked past `HEAD_DIM`)."""
    return pow2_at_least_16(head_dim)


def group_tile(group: int, rows: int) -> tuple[int, int]:
    """`(BG, BT)` for grouped rows: the GQA group (query heads per kv head) padded to a power of two,
    and the tokens per tile, so that a tile has about `rows` rows (tokens x heads) and at least 16."""
    bg = triton.next_power_of_2(group)
    return bg, max(1, max(rows, 16) // bg)


def doc_start_arg(q: torch.Tensor, doc_start: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """`(doc_start, HAS_DOCS)` for a launch: the `[B, T]` int32 document starts, or a placeholder."""
    if doc_start is None:
        return torch.zeros(1, dtype=torch.int32, device=q.device), False
    return doc_start.to(torch.int32).contiguous(), True


@triton.jit
def softmax_init(BM: tl.constexpr, BD: tl.constexpr):
    """`(acc, l, m)` of an online softmax over `BM` rows of width `BD`: nothing seen yet."""
    b_acc = tl.zeros([BM, BD], dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    return b_acc, b_l, b_m


@triton.jit
def softmax_step(b_acc, b_l, b_m, b_s, b_v, PRECISION: tl.constexpr):
    """Fold one key tile into the online softmax: `b_s` `[BM, BN]` base-2 scores (`-inf` where
    masked), `b_v` `[BN, BD]` its values. Returns the new `(acc, l, m)`."""
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    # A row that has seen no key keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
    b_shift = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
    b_p = tl.exp2(b_s - b_shift[:, None])
    b_alpha = tl.exp2(b_m - b_shift)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
    return b_acc, b_l, b_m_new


@triton.jit
def softmax_finish(b_acc, b_l, b_m):
    """`(o, lse)` from the online softmax: `o = acc / l` and the natural-log `lse`; rows that saw no
    key give `o = 0`, `lse = -inf` (they then drop out of an lse merge)."""
    b_seen = b_l > 0
    b_l = tl.where(b_seen, b_l, 1.0)
    b_o = b_acc / b_l[:, None]
    b_lse = tl.where(b_seen, (b_m + tl.log2(b_l)) * LN2_C, float("-inf"))
    return b_o, b_lse


@triton.jit
def group_rows(i_t, T, GROUP: tl.constexpr, BG: tl.constexpr, BT: tl.constexpr):
    """Grouped rows of tile `i_t`: row `r` is token `i_t * BT + r // BG` and query head `r % BG` of a
    kv head's group, so every K/V tile a program loads serves the whole group. Returns the token
    `o_t`, the head in the group `o_g` and the row mask `m_r` (`[BT * BG]` each)."""
    o_r = tl.arange(0, BT * BG)
    o_t = i_t * BT + o_r // BG
    o_g = o_r % BG
    return o_t, o_g, (o_t < T) & (o_g < GROUP)


@triton.jit
def row_offset(i_b, T, o_t, H, i_h, GROUP, o_g, HEAD_DIM):
    """Element offset of (batch `i_b`, token `o_t`, query head `i_h * GROUP + o_g`) in a
    `[B, T, H, HEAD_DIM]` tensor, int64 from the token on (`T * H * HEAD_DIM` passes 2^31 at 1M tokens,
    32 heads of 128)."""
    return ((i_b * T + o_t).to(tl.int64) * H + i_h * GROUP + o_g) * HEAD_DIM



@triton.jit
def group_row_tile(i_b, T, o_t, H, i_h, GROUP, o_g, m_r, HEAD_DIM, BD: tl.constexpr):
    """`(offsets, mask)` `[rows, BD]` of grouped rows (`group_rows`) in a `[B, T, H, HEAD_DIM]` tensor:
    load them with `tl.load(x + offsets, mask=mask, other=0.0)`."""
    o_d = tl.arange(0, BD)
    o_rd = row_offset(i_b, T, o_t, H, i_h, GROUP, o_g, HEAD_DIM)[:, None] + o_d[None, :]
    return o_rd, m_r[:, None] & (o_d < HEAD_DIM)[None, :]

@triton.jit
def lse_offset(i_b, T, o_t, H, i_h, GROUP, o_g):
    """Element offset of (batch `i_b`, query head `i_h * GROUP + o_g`, token `o_t`) in a `[B, H, T]`
    lse (or delta) tensor, in int64."""
    return (i_b * H + i_h * GROUP + o_g).to(tl.int64) * T + o_t


@triton.jit
def strided_tile(base, r0, c0, R, C, stride_r, stride_c, BR: tl.constexpr, BC: tl.constexpr):
    """Pointers and in-bounds mask of the `[BR, BC]` tile at `(r0, c0)` of an `[R, C]` strided matrix
    (the chunked linear ops' loads). Both offsets in int64: a token axis may be the columns (k^T
    tiles, stride H*K), and t*H*K passes 2^31 at about 1M tokens with H*K = 2048."""
    o_r = r0 + tl.arange(0, BR)
    o_c = c0 + tl.arange(0, BC)
    p = base + o_r.to(tl.int64)[:, None] * stride_r + o_c.to(tl.int64)[None, :] * stride_c
    return p, (o_r < R)[:, None] & (o_c < C)[None, :]
