"""Dense flash attention in Triton: forward, and backward recomputed from the log-sum-exp.

The scheme is FlashAttention-2's, with global positions so one launch can compute any (query chunk,
key chunk) pair of a context-parallel ring. Query row `i` sits at position `q_offset + i`, key `j` at
`k_offset + j`; the kernels only see `off = q_offset - k_offset`, and row `i` sees key `j` iff

    j < Tk  and  (not CAUSAL or j <= i + off)  and  (window is None or j > i + off - window).

Forward (`_attn_fwd_kernel`, one program per `BM` queries of one head): online softmax over key
blocks with fp32 accumulators, in base 2 (`scale * log2(e)` folded into one multiply, `exp2`
throughout). From its first and last rows a program works out the key blocks `[lo, hi)` it can see at
all (causal and window block skipping: a chunk pair that sees nothing costs only the launch, and the
host skips even that), and the sub-range `[a, b)` every one of its rows sees in full. Only blocks
outside `[a, b)` (the causal diagonal, the window's left edge, the key tail) build a mask; the test is
one uniform branch per block. Three separate loops (masked / unmasked / masked) do the same work,
but compiled for sm_90 each loop is software-pipelined on its own and the kernel needs more registers:
the forward at head dim 128 (128x64 tile, 8 warps) takes 214 registers instead of 176, and dK/dV
spills where the single loop does not. The output is normalised once at the end; rows that see no
key get `o = 0`, `lse = -inf`.

Backward, in three launches:
1. `_attn_bwd_pre_kernel`: `delta = rowsum(dO * O) - dlse` and `lse2 = lse * log2(e)`, with `-inf`
   turned into `+inf` so that `P = exp2(S * scale * log2(e) - lse2)` is 0 for rows whose lse is -inf
   (never NaN, even if the lse passed in says a row is empty where its keys are visible). `O` and `lse`
   may be the final merged output and lse of the whole row (ring attention's backward).
2. `_attn_bwd_dkdv_kernel`: one program per `BN` keys of one kv head keeps K, V (in shared memory)
   and the fp32 dK, dV accumulators, and loops over the query heads of its GQA group and the query
   blocks that can see those keys, recomputing `P^T` from `lse2`. dK and dV are summed over the group
   in registers: no atomics, deterministic, stored once in the kv-head shape.
3. `_attn_bwd_dq_kernel`: one program per `BM` queries of one head loops over its visible key blocks
   and accumulates dQ. Recomputing `S` and `dP` here costs two matmuls more than adding dQ with
   atomics from the dK/dV kernel (7 instead of 5), and buys deterministic results, no fp32 dQ buffer
   and no atomic traffic.

Every kernel is tuned over a few block/warp/stage configs keyed on the head dim, causality, the window
flag and the dtypes (`longctx.kernels.common.tuning`: `LONGCTX_TUNE=on|cache|off`, rank 0 decides under
torch.distributed). Under the interpreter (`TRITON_INTERPRET=1`, how the CPU
tests run them) one fixed config is used, so nothing is benchmarked. `tl.dot` accumulates in fp32;
fp32 inputs use IEEE products (no TF32). Head dims are padded to a power of two >= 16 with masked
loads. Pointer tiles are rebuilt each step from a 64-bit row offset (no pointer tiles live across
iterations; Triton 3.9 has no block pointers).
"""

import torch
import triton
import triton.language as tl

from longctx.kernels.common.backend import interpreting
from longctx.kernels.common.triton import (
    LOG2E,
    LOG2E_C,
    dot_precision,
    head_dim_tile,
    softmax_finish,
    softmax_init,
    softmax_step,
)
from longctx.kernels.common.tuning import sm8x, tuned

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _configs(gpu: list[tuple[int, int, int, int]], interp: tuple[int, int]) -> list[triton.Config]:
    """Autotune candidates `(BM, BN, num_warps, num_stages)`, or the one fixed interpreter config."""
    if interpreting():
        return [triton.Config({"BM": interp[0], "BN": interp[1]}, num_warps=1, num_stages=1)]
    return [triton.Config({"BM": m, "BN": n}, num_warps=w, num_stages=s) for m, n, w, s in gpu]


_TUNE_KEY = ["HEAD_DIM", "CAUSAL", "HAS_WINDOW", "HAS_DOCS"]
# Candidates chosen by compiling for sm_90 (Triton 3.9 with its ptxas, no GPU: `python -m
# longctx.kernels.aot`) and keeping those that need no register spills at head dim <= 128 (e.g. forward
# 128x64 with 8 warps: 176 registers), plus a few that only suit head dim <= 64 and small ones for head
# dims up to 256. Forward and dQ take BM queries
# against BN keys per step (BM > BN: the causal diagonal spans a few key blocks); dK/dV the reverse.
# The interpreter configs keep BM != BN for the same reason, and are large to keep the interpreter fast.
# sm_80 (and sm_86/89) at head dims <= 128: mma.sync takes its operands from registers (sm_90's wgmma
# reads them from shared memory), so tiles that fit sm_90's registers spill there. Compiled for sm_80
# at hd 128 (bf16; causal / windowed / full; triton 3.9 and 3.6): the forward's 128-row tiles spill 8 B
# (causal) and 128x128 w8 s3 needs 196,608 B of shared memory (sm_80 allows 166,912), 64x64 w4 s3 and
# 64x32 w4 s2 8 B; dK/dV's 128-key tiles spill 8-3,368 B; dQ's 128-row tiles 16-7,608 B and 64x64 w4
# s2 8 B (windowed). These spill in none of the three and are the only candidates there (`_prune`);
# the forward's two 8-warp tiles are sm_8x's own (not compiled for sm_90, so not offered there).
_FWD_AMPERE = [(64, 64, 8, 2), (64, 64, 8, 3)]
_DKDV_AMPERE = [(32, 64, 4, 2), (16, 64, 4, 3)]
_DQ_AMPERE = [(64, 32, 4, 3)]
_FWD_CONFIGS = _configs(
    [
        (128, 64, 8, 3),
        (128, 64, 8, 4),
        (128, 128, 8, 2),
        (128, 128, 8, 3),
        (64, 64, 4, 3),
        (64, 32, 4, 2),
        *_FWD_AMPERE,
    ],
    interp=(64, 32),
)
# dK/dV over head dims above 128: the two fp32 [BN, 256] accumulators of a 128- or 64-key tile spill in
# every config above (and 16x64 w8 s1: 80 B); these 32-key tiles do not (sm_90, bf16, causal: 236, 166
# and 188 registers) and are the tuner's only candidates there, and only there (the tiles above are
# faster at head dims <= 128). Measured with `python -m longctx.kernels.aot --families flash --kernels
# dkdv --head-dims 256` (docs/kernels.md).
_DKDV_WIDE = [(16, 32, 4, 1), (16, 32, 8, 2), (32, 32, 8, 2)]
_DKDV_CONFIGS = _configs(
    [(32, 128, 8, 2), (32, 128, 8, 3), (16, 128, 8, 3), (32, 64, 4, 2), (16, 64, 4, 3), *_DKDV_WIDE],
    interp=(32, 64),
)


def _config_key(c) -> tuple:
    return c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages


def _prune(wide: list, ampere: list, not_sm90: list, not_ampere_padded: tuple = ()):
    """The tuner's candidates for a launch on `sm_<arch>` (`Tuned.candidates`; arch None: no GPU
    known): only `wide` above head dim 128; on sm_8x at head dims <= 128 only `ampere`, less
    `not_ampere_padded` where the head dim is not a power of two (its tile is padded and masked); else
    every candidate but `not_sm90`."""

    def prune(configs, values, arch):
        head_dim = values["HEAD_DIM"]
        if head_dim > 128:
            return [c for c in configs if _config_key(c) in wide]
        if sm8x(arch):
            padded = head_dim & (head_dim - 1) != 0
            keep = [c for c in ampere if not (padded and c in not_ampere_padded)]
            return [c for c in configs if _config_key(c) in keep]
        return [c for c in configs if _config_key(c) not in not_sm90]

    return prune


# Forward and dQ above head dim 128 (sm_90, bf16, causal, hd 256): every 128-row candidate needs
# 262,144 B or more of shared memory (sm_90 allows 232,448), 64x64 spills (32 and 136 B); these fit
# sm_80's 166,912 B too and do not spill on sm_90 (234 and 232 registers). The only candidates there.
_FWD_WIDE = [(64, 32, 4, 2)]
_DQ_WIDE = [(64, 32, 4, 3)]
_DQ_CONFIGS = _configs(
    [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (128, 128, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3)],
    interp=(64, 32),
)
# sm_90 at hd 128 (bf16; causal, windowed and full, all compiled this round): dK/dV 32x128 w8 s3 spills
# 8 B and 32x64 w4 s2 24 B, dQ 128x128 w8 s2 40 B; not offered there. sm_80 at hd 96 (bf16 and fp16,
# the full AOT matrix): the forward's 64x64 w8 s2 spills 8 B (causal) and dK/dV's 32x64 w4 s2 8-16 B,
# where they do not at hd 64 or 128 (the masked tail of the padded head dim costs registers); the
# other sm_8x candidate of each is kept.
_FWD_PRUNE = _prune(_FWD_WIDE, _FWD_AMPERE, not_sm90=_FWD_AMPERE, not_ampere_padded=((64, 64, 8, 2),))
_DKDV_PRUNE = _prune(
    _DKDV_WIDE,
    _DKDV_AMPERE,
    not_sm90=[*_DKDV_WIDE, (32, 128, 8, 3), (32, 64, 4, 2)],
    not_ampere_padded=((32, 64, 4, 2),),
)
_DQ_PRUNE = _prune(_DQ_WIDE, _DQ_AMPERE, not_sm90=[(128, 128, 8, 2)])
_PRE_BLOCK = 64


@triton.jit
def _rows_ptr(base, start, stride_t, BR: tl.constexpr, BD: tl.constexpr):
    """Pointers to rows `[start, start + BR)` x head dims `[0, BD)` of one (batch, head) slice. The row
    offset is a 64-bit scalar and the tile part a small int32, so loops carry no pointer tiles."""
    o_r = tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    return base + tl.cast(start, tl.int64) * stride_t + (o_r[:, None] * stride_t + o_d[None, :])


@triton.jit
def _load(
    p,
    start,
    n_rows,
    HEAD_DIM: tl.constexpr,
    BR: tl.constexpr,
    BD: tl.constexpr,
    CHECK_ROWS: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    """Load a `[BR, BD]` tile, zero past row `n_rows` (if CHECK_ROWS) and in padded head dims."""
    o_r = start + tl.arange(0, BR)
    m_d = tl.arange(0, BD) < HEAD_DIM
    if CHECK_ROWS:
        if EVEN_D:
            b_x = tl.load(p, mask=(o_r < n_rows)[:, None], other=0.0)
        else:
            b_x = tl.load(p, mask=(o_r < n_rows)[:, None] & m_d[None, :], other=0.0)
    else:
        if EVEN_D:
            b_x = tl.load(p)
        else:
            b_x = tl.load(p, mask=m_d[None, :], other=0.0)
    return b_x


@triton.jit
def _store(p, b_x, start, n_rows, HEAD_DIM: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    o_r = start + tl.arange(0, BR)
    m_x = (o_r < n_rows)[:, None] & (tl.arange(0, BD) < HEAD_DIM)[None, :]
    tl.store(p, b_x.to(p.dtype.element_ty), mask=m_x)


@triton.jit
def _visible(
    o_q, o_k, n_k, off, window, CHECK_K: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr
):
    """Whether query `o_q` may see key `o_k` (broadcast chunk-local index tensors), by position and,
    if CHECK_K, by the key count. Needs at least one of CHECK_K, CAUSAL, HAS_WINDOW."""
    if CAUSAL:
        m_x = o_k <= o_q + off
        if HAS_WINDOW:
            m_x = m_x & (o_k > o_q + off - window)
        if CHECK_K:
            m_x = m_x & (o_k < n_k)
    elif HAS_WINDOW:
        m_x = o_k > o_q + off - window
        if CHECK_K:
            m_x = m_x & (o_k < n_k)
    else:
        m_x = o_k < n_k
    return m_x


@triton.jit
def _key_range(
    m0,
    n_q,
    n_k,
    off,
    window,
    doc_first,
    doc_last,
    BM: tl.constexpr,
    BN: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    """Key loop bounds for queries `[m0, m0 + BM)`: `[lo, a)` masked, `[a, b)` seen by every row
    (unmasked), `[b, hi)` masked. `lo`, `a`, `b` are multiples of BN (or `a = b = hi`); together they
    cover every visible key. Values are clamped at 0 before dividing (integer division of negative
    numbers rounds differently on the GPU and in the interpreter). With documents, `doc_first` and
    `doc_last` are the first visible key of the first and the last row (their documents' starts):
    key blocks before the first row's document are never visited."""
    m_last = tl.minimum(m0 + BM, n_q) - 1
    hi = n_k
    full_hi = n_k
    if CAUSAL:
        hi = tl.minimum(hi, tl.maximum(m_last + off + 1, 0))
        full_hi = tl.minimum(full_hi, tl.maximum(m0 + off + 1, 0))
    lo = 0
    full_lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(m0 + off - window + 1, 0)
        full_lo = tl.maximum(m_last + off - window + 1, 0)
    if HAS_DOCS:
        lo = tl.maximum(lo, doc_first)
        full_lo = tl.maximum(full_lo, doc_last)
    lo = (lo // BN) * BN
    a = tl.minimum(tl.cdiv(full_lo, BN) * BN, hi)
    b = tl.maximum((full_hi // BN) * BN, a)
    return lo, a, b, hi


@triton.jit
def _query_range(
    n0,
    n_q,
    n_k,
    off,
    window,
    doc_first,
    doc_last,
    BM: tl.constexpr,
    BN: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    """Query loop bounds for keys `[n0, n0 + BN)`, split like `_key_range`: `[lo, a)` masked (the causal
    diagonal), `[a, b)` unmasked, `[b, hi)` masked (window edge and the query tail). With documents,
    `doc_first` and `doc_last` are the query ends (exclusive) of the first and the last key's
    documents: query blocks after the last key's document are never visited."""
    n_last = tl.minimum(n0 + BN, n_k) - 1
    lo = 0
    full_lo = 0
    if CAUSAL:
        lo = tl.maximum(n0 - off, 0)
        full_lo = tl.maximum(n_last - off, 0)
    hi = n_q
    full_hi = n_q
    if HAS_WINDOW:
        hi = tl.minimum(hi, tl.maximum(n_last - off + window, 0))
        full_hi = tl.minimum(full_hi, tl.maximum(n0 - off + window, 0))
    if HAS_DOCS:
        hi = tl.minimum(hi, tl.maximum(doc_last, 0))
        full_hi = tl.minimum(full_hi, tl.maximum(doc_first, 0))
    lo = (lo // BM) * BM
    a = tl.minimum(tl.cdiv(full_lo, BM) * BM, hi)
    b = tl.maximum((full_hi // BM) * BM, a)
    return lo, a, b, hi


@triton.jit
def _doc_lo(DOC_LO, i_b, m0, o_m, n_q, BM: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Per row of queries `[m0, m0 + BM)` the first key it may see (its document's start, in key
    indices), and that of the first and the last row; zeros without documents."""
    b_dlo = tl.zeros([BM], dtype=tl.int32)
    doc_first = 0
    doc_last = 0
    if HAS_DOCS:
        p_dlo = DOC_LO + i_b.to(tl.int64) * n_q
        b_dlo = tl.load(p_dlo + o_m, mask=o_m < n_q, other=0)
        doc_first = tl.maximum(tl.load(p_dlo + m0), 0)
        doc_last = tl.maximum(tl.load(p_dlo + tl.minimum(m0 + BM, n_q) - 1), 0)
    return b_dlo, doc_first, doc_last


@triton.jit
def _attn_fwd_inner(
    b_acc,
    b_l,
    b_m,
    b_q,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    lo,
    a,
    b,
    hi,
    o_m,
    b_dlo,
    n_k,
    off,
    window,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BD: tl.constexpr,
    BN: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BN):
        b_k = _load(
            _rows_ptr(k_base, start_n, stride_kt, BN, BD), start_n, n_k, HEAD_DIM, BN, BD, True, EVEN_D
        )
        b_v = _load(
            _rows_ptr(v_base, start_n, stride_vt, BN, BD), start_n, n_k, HEAD_DIM, BN, BD, True, EVEN_D
        )
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale  # [BM, BN]
        if (start_n < a) | (start_n >= b):
            o_n = start_n + tl.arange(0, BN)
            m_s = _visible(o_m[:, None], o_n[None, :], n_k, off, window, True, CAUSAL, HAS_WINDOW)
            if HAS_DOCS:
                m_s = m_s & (o_n[None, :] >= b_dlo[:, None])
            b_s = tl.where(m_s, b_s, float("-inf"))
        b_acc, b_l, b_m = softmax_step(b_acc, b_l, b_m, b_s, b_v, PRECISION)
    return b_acc, b_l, b_m


@tuned(_FWD_CONFIGS, _TUNE_KEY, prune=_FWD_PRUNE)
@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ob,
    stride_ot,
    stride_oh,
    n_q,
    n_k,
    n_heads,
    n_group,
    off,
    window,
    qk_scale,
    DOC_LO,
    HEAD_DIM: tl.constexpr,
    BD: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    # Causal programs with the most keys start first, so the short ones fill the tail of the grid.
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // n_heads
    i_h = i_bh % n_heads
    i_hk = i_h // n_group
    EVEN_D: tl.constexpr = HEAD_DIM == BD
    m0 = i_m * BM
    o_m = m0 + tl.arange(0, BM)

    q_base = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    k_base = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    v_base = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    b_q = _load(_rows_ptr(q_base, m0, stride_qt, BM, BD), m0, n_q, HEAD_DIM, BM, BD, True, EVEN_D)

    b_acc, b_l, b_m = softmax_init(BM, BD)
    b_dlo, doc_first, doc_last = _doc_lo(DOC_LO, i_b, m0, o_m, n_q, BM, HAS_DOCS)
    lo, a, b, hi = _key_range(
        m0, n_q, n_k, off, window, doc_first, doc_last, BM, BN, CAUSAL, HAS_WINDOW, HAS_DOCS
    )
    b_acc, b_l, b_m = _attn_fwd_inner(
        b_acc,
        b_l,
        b_m,
        b_q,
        k_base,
        v_base,
        stride_kt,
        stride_vt,
        lo,
        a,
        b,
        hi,
        o_m,
        b_dlo,
        n_k,
        off,
        window,
        qk_scale,
        HEAD_DIM,
        BD,
        BN,
        CAUSAL,
        HAS_WINDOW,
        HAS_DOCS,
        EVEN_D,
        PRECISION,
    )

    b_o, b_lse = softmax_finish(b_acc, b_l, b_m)
    o_base = O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    _store(_rows_ptr(o_base, m0, stride_ot, BM, BD), b_o, m0, n_q, HEAD_DIM, BM, BD)
    tl.store(LSE + i_bh.to(tl.int64) * n_q + o_m, b_lse, mask=o_m < n_q)


@triton.jit
def _attn_bwd_pre_kernel(
    O,
    DO,
    LSE,
    DLSE,
    DELTA,
    LSE2,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_dob,
    stride_dot,
    stride_doh,
    n_q,
    n_heads,
    HEAD_DIM: tl.constexpr,
    BD: tl.constexpr,
    HAS_DLSE: tl.constexpr,
    BM: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // n_heads
    i_h = i_bh % n_heads
    o_m = i_m * BM + tl.arange(0, BM)
    o_base = O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    do_base = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
    m0 = i_m * BM
    b_o = _load(_rows_ptr(o_base, m0, stride_ot, BM, BD), m0, n_q, HEAD_DIM, BM, BD, True, False)
    b_do = _load(_rows_ptr(do_base, m0, stride_dot, BM, BD), m0, n_q, HEAD_DIM, BM, BD, True, False)
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)
    o_row = i_bh.to(tl.int64) * n_q + o_m
    if HAS_DLSE:
        b_delta -= tl.load(DLSE + o_row, mask=o_m < n_q, other=0.0)
    b_lse = tl.load(LSE + o_row, mask=o_m < n_q, other=0.0)
    b_lse2 = tl.where(b_lse == float("-inf"), float("inf"), b_lse * LOG2E_C)
    tl.store(DELTA + o_row, b_delta, mask=o_m < n_q)
    tl.store(LSE2 + o_row, b_lse2, mask=o_m < n_q)


@triton.jit
def _attn_bwd_dkdv_inner(
    b_dk,
    b_dv,
    b_k,
    b_v,
    q_base,
    do_base,
    lse2_base,
    delta_base,
    dlo_base,
    stride_qt,
    stride_dot,
    lo,
    a,
    b,
    hi,
    o_n,
    n_q,
    n_k,
    off,
    window,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BD: tl.constexpr,
    BM: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    for start_m in range(lo, hi, BM):
        o_m = start_m + tl.arange(0, BM)
        b_q = _load(
            _rows_ptr(q_base, start_m, stride_qt, BM, BD), start_m, n_q, HEAD_DIM, BM, BD, True, EVEN_D
        )
        b_do = _load(
            _rows_ptr(do_base, start_m, stride_dot, BM, BD), start_m, n_q, HEAD_DIM, BM, BD, True, EVEN_D
        )
        b_lse2 = tl.load(lse2_base + o_m, mask=o_m < n_q, other=float("inf"))
        b_delta = tl.load(delta_base + o_m, mask=o_m < n_q, other=0.0)
        b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION)  # [BN, BM]
        b_pt = tl.math.exp2(b_st * qk_scale - b_lse2[None, :])
        if CAUSAL or HAS_WINDOW:
            if (start_m < a) | (start_m >= b):
                m_s = _visible(o_m[None, :], o_n[:, None], n_k, off, window, False, CAUSAL, HAS_WINDOW)
                if HAS_DOCS:
                    b_dlo = tl.load(dlo_base + o_m, mask=o_m < n_q, other=0)
                    m_s = m_s & (o_n[:, None] >= b_dlo[None, :])
                b_pt = tl.where(m_s, b_pt, 0.0)
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PRECISION)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)  # [BN, BM]
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PRECISION)
    return b_dk, b_dv


@tuned(_DKDV_CONFIGS, _TUNE_KEY, prune=_DKDV_PRUNE)
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE2,
    DELTA,
    DK,
    DV,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_dkb,
    stride_dkt,
    stride_dkh,
    stride_dvb,
    stride_dvt,
    stride_dvh,
    n_q,
    n_k,
    n_heads,
    n_group,
    off,
    window,
    qk_scale,
    scale,
    DOC_LO,
    DOC_HI,
    HEAD_DIM: tl.constexpr,
    BD: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_bhk = tl.program_id(1)
    n_kv_heads = n_heads // n_group
    i_b = i_bhk // n_kv_heads
    i_hk = i_bhk % n_kv_heads
    EVEN_D: tl.constexpr = HEAD_DIM == BD
    n0 = i_n * BN
    o_n = n0 + tl.arange(0, BN)

    k_base = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    v_base = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    b_k = _load(_rows_ptr(k_base, n0, stride_kt, BN, BD), n0, n_k, HEAD_DIM, BN, BD, True, EVEN_D)
    b_v = _load(_rows_ptr(v_base, n0, stride_vt, BN, BD), n0, n_k, HEAD_DIM, BN, BD, True, EVEN_D)
    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BD], dtype=tl.float32)
    doc_first = 0
    doc_last = 0
    if HAS_DOCS:
        # The query end (exclusive) of the first and the last key's documents.
        p_dhi = DOC_HI + i_b.to(tl.int64) * n_k
        doc_first = tl.load(p_dhi + n0)
        doc_last = tl.load(p_dhi + tl.minimum(n0 + BN, n_k) - 1)
    lo, a, b, hi = _query_range(
        n0, n_q, n_k, off, window, doc_first, doc_last, BM, BN, CAUSAL, HAS_WINDOW, HAS_DOCS
    )
    # The query heads of this kv head's group all add into the same dK, dV.
    for g in range(0, n_group):
        i_h = i_hk * n_group + g
        q_base = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
        do_base = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
        lse2_base = LSE2 + (i_b * n_heads + i_h).to(tl.int64) * n_q
        delta_base = DELTA + (i_b * n_heads + i_h).to(tl.int64) * n_q
        dlo_base = DOC_LO + i_b.to(tl.int64) * n_q
        b_dk, b_dv = _attn_bwd_dkdv_inner(
            b_dk,
            b_dv,
            b_k,
            b_v,
            q_base,
            do_base,
            lse2_base,
            delta_base,
            dlo_base,
            stride_qt,
            stride_dot,
            lo,
            a,
            b,
            hi,
            o_n,
            n_q,
            n_k,
            off,
            window,
            qk_scale,
            HEAD_DIM,
            BD,
            BM,
            CAUSAL,
            HAS_WINDOW,
            HAS_DOCS,
            EVEN_D,
            PRECISION,
        )

    dk_base = DK + i_b.to(tl.int64) * stride_dkb + i_hk.to(tl.int64) * stride_dkh
    dv_base = DV + i_b.to(tl.int64) * stride_dvb + i_hk.to(tl.int64) * stride_dvh
    _store(_rows_ptr(dk_base, n0, stride_dkt, BN, BD), b_dk * scale, n0, n_k, HEAD_DIM, BN, BD)
    _store(_rows_ptr(dv_base, n0, stride_dvt, BN, BD), b_dv, n0, n_k, HEAD_DIM, BN, BD)


@triton.jit
def _attn_bwd_dq_inner(
    b_dq,
    b_q,
    b_do,
    b_lse2,
    b_delta,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    lo,
    a,
    b,
    hi,
    o_m,
    b_dlo,
    n_k,
    off,
    window,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BD: tl.constexpr,
    BN: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BN):
        b_k = _load(
            _rows_ptr(k_base, start_n, stride_kt, BN, BD), start_n, n_k, HEAD_DIM, BN, BD, True, EVEN_D
        )
        b_v = _load(
            _rows_ptr(v_base, start_n, stride_vt, BN, BD), start_n, n_k, HEAD_DIM, BN, BD, True, EVEN_D
        )
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)  # [BM, BN]
        b_p = tl.math.exp2(b_s * qk_scale - b_lse2[:, None])
        if (start_n < a) | (start_n >= b):
            o_n = start_n + tl.arange(0, BN)
            m_s = _visible(o_m[:, None], o_n[None, :], n_k, off, window, True, CAUSAL, HAS_WINDOW)
            if HAS_DOCS:
                m_s = m_s & (o_n[None, :] >= b_dlo[:, None])
            b_p = tl.where(m_s, b_p, 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)
    return b_dq


@tuned(_DQ_CONFIGS, _TUNE_KEY, prune=_DQ_PRUNE)
@triton.jit
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE2,
    DELTA,
    DQ,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_dqb,
    stride_dqt,
    stride_dqh,
    n_q,
    n_k,
    n_heads,
    n_group,
    off,
    window,
    qk_scale,
    scale,
    DOC_LO,
    DOC_HI,
    HEAD_DIM: tl.constexpr,
    BD: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // n_heads
    i_h = i_bh % n_heads
    i_hk = i_h // n_group
    EVEN_D: tl.constexpr = HEAD_DIM == BD
    m0 = i_m * BM
    o_m = m0 + tl.arange(0, BM)

    q_base = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    do_base = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
    b_q = _load(_rows_ptr(q_base, m0, stride_qt, BM, BD), m0, n_q, HEAD_DIM, BM, BD, True, EVEN_D)
    b_do = _load(_rows_ptr(do_base, m0, stride_dot, BM, BD), m0, n_q, HEAD_DIM, BM, BD, True, EVEN_D)
    o_row = i_bh.to(tl.int64) * n_q + o_m
    # Padded rows get lse2 = +inf, so P = 0 there.
    b_lse2 = tl.load(LSE2 + o_row, mask=o_m < n_q, other=float("inf"))
    b_delta = tl.load(DELTA + o_row, mask=o_m < n_q, other=0.0)
    k_base = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    v_base = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh

    b_dq = tl.zeros([BM, BD], dtype=tl.float32)
    b_dlo, doc_first, doc_last = _doc_lo(DOC_LO, i_b, m0, o_m, n_q, BM, HAS_DOCS)
    lo, a, b, hi = _key_range(
        m0, n_q, n_k, off, window, doc_first, doc_last, BM, BN, CAUSAL, HAS_WINDOW, HAS_DOCS
    )
    b_dq = _attn_bwd_dq_inner(
        b_dq,
        b_q,
        b_do,
        b_lse2,
        b_delta,
        k_base,
        v_base,
        stride_kt,
        stride_vt,
        lo,
        a,
        b,
        hi,
        o_m,
        b_dlo,
        n_k,
        off,
        window,
        qk_scale,
        HEAD_DIM,
        BD,
        BN,
        CAUSAL,
        HAS_WINDOW,
        HAS_DOCS,
        EVEN_D,
        PRECISION,
    )

    dq_base = DQ + i_b.to(tl.int64) * stride_dqb + i_h.to(tl.int64) * stride_dqh
    _store(_rows_ptr(dq_base, m0, stride_dqt, BM, BD), b_dq * scale, m0, n_q, HEAD_DIM, BM, BD)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"the flash-attention kernel takes q, k, v of one dtype among {SUPPORTED_DTYPES}, "
            f"got {q.dtype}, {k.dtype}, {v.dtype}; cast them first"
        )
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(
            f"the flash-attention kernel supports head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}"
        )


def _rowmajor(x: torch.Tensor) -> torch.Tensor:
    """Kernels index the head dim with unit stride; other strides are passed through."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _common(q: torch.Tensor, k: torch.Tensor, window: int | None):
    d = q.shape[-1]
    return dict(
        HEAD_DIM=d,
        BD=head_dim_tile(d),
        HAS_WINDOW=window is not None,
        PRECISION=dot_precision(q.dtype),
    ), q.shape[2] // k.shape[2]


def _strides(*tensors: torch.Tensor) -> list[int]:
    """Batch, token and head strides of `[B, T, H, D]` tensors, in order."""
    return [x for t in tensors for x in (t.stride(0), t.stride(1), t.stride(2))]


def _doc_args(q: torch.Tensor, docs) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """`(DOC_LO, DOC_HI, HAS_DOCS)`: per query the first key index it may see and per key the query
    index past its document (int32 `[B, Tq]`, `[B, Tk]`), or placeholders without documents."""
    if docs is None:
        dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
        return dummy, dummy, False
    doc_lo, doc_hi = docs
    return doc_lo.to(torch.int32).contiguous(), doc_hi.to(torch.int32).contiguous(), True


def attn_fwd(q, k, v, off: int, causal: bool, scale: float, window: int | None, docs=None):
    """Launch the forward. `off = q_offset - k_offset`. `docs`: None, or `(doc_lo [B, Tq], doc_hi
    [B, Tk])` int32 (`_doc_args`); causal only.

    Returns `o` `[B, Tq, H, D]` in q's dtype and `lse` `[B, H, Tq]` fp32.
    """
    _check(q, k, v)
    q, k, v = _rowmajor(q), _rowmajor(k), _rowmajor(v)
    b, t_q, n_heads, _ = q.shape
    t_k = k.shape[1]
    o = torch.empty_like(q)
    lse = torch.empty(b, n_heads, t_q, dtype=torch.float32, device=q.device)
    meta, n_group = _common(q, k, window)
    doc_lo, _, has_docs = _doc_args(q, docs)
    grid = lambda META: (triton.cdiv(t_q, META["BM"]), b * n_heads)
    _attn_fwd_kernel[grid](
        q,
        k,
        v,
        o,
        lse,
        *_strides(q, k, v, o),
        t_q,
        t_k,
        n_heads,
        n_group,
        off,
        window or 0,
        scale * LOG2E,
        doc_lo,
        CAUSAL=causal,
        HAS_DOCS=has_docs,
        **meta,
    )
    return o, lse


def attn_bwd(
    do, q, k, v, o, lse, off: int, causal: bool, scale: float, window: int | None, dlse=None, docs=None
):
    """Launch the backward. `o`, `lse` may be the merged output and lse of a larger key set.

    Returns `(dq, dk, dv)` in the dtypes and shapes of `q`, `k`, `v`.
    """
    _check(q, k, v)
    # The matmuls take dO in the inputs' dtype (it may arrive in fp32, e.g. from an fp32 merge).
    q, k, v, o, do = (_rowmajor(x) for x in (q, k, v, o, do.to(q.dtype)))
    b, t_q, n_heads, d = q.shape
    t_k, n_kv_heads = k.shape[1], k.shape[2]
    meta, n_group = _common(q, k, window)
    lse = lse.float().contiguous()
    delta = torch.empty_like(lse)
    lse2 = torch.empty_like(lse)
    has_dlse = dlse is not None
    pre_block = _PRE_BLOCK if meta["BD"] <= 128 else _PRE_BLOCK // 2
    _attn_bwd_pre_kernel[(triton.cdiv(t_q, pre_block), b * n_heads)](
        o,
        do,
        lse,
        dlse.float().contiguous() if has_dlse else lse,
        delta,
        lse2,
        *_strides(o, do),
        t_q,
        n_heads,
        HEAD_DIM=d,
        BD=meta["BD"],
        HAS_DLSE=has_dlse,
        BM=pre_block,
    )
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    doc_lo, doc_hi, has_docs = _doc_args(q, docs)
    args = (t_q, t_k, n_heads, n_group, off, window or 0, scale * LOG2E, scale, doc_lo, doc_hi)
    grid = lambda META: (triton.cdiv(t_k, META["BN"]), b * n_kv_heads)
    _attn_bwd_dkdv_kernel[grid](
        q,
        k,
        v,
        do,
        lse2,
        delta,
        dk,
        dv,
        *_strides(q, k, v, do, dk, dv),
        *args,
        CAUSAL=causal,
        HAS_DOCS=has_docs,
        **meta,
    )
    grid = lambda META: (triton.cdiv(t_q, META["BM"]), b * n_heads)
    _attn_bwd_dq_kernel[grid](
        q,
        k,
        v,
        do,
        lse2,
        delta,
        dq,
        *_strides(q, k, v, do, dq),
        *args,
        CAUSAL=causal,
        HAS_DOCS=has_docs,
        **meta,
    )
    return dq, dk, dv


class FlashAttnFunction(torch.autograd.Function):
    """The kernels' `(o, lse)` of a query chunk against a key chunk, differentiable in both outputs.

    `off = q_offset - k_offset`; `docs`: None, or the pair's document bounds (an object whose
    `kernel_args()` gives `attn_fwd`'s `docs`, computed again in the backward rather than kept);
    `empty`: no query of the pair sees any key, so nothing is launched: `o = 0`, `lse = -inf`, zero
    gradients.
    """

    @staticmethod
    def forward(ctx, q, k, v, off, causal, scale, window, docs, empty):
        if empty:
            o = torch.zeros_like(q)
            b, t_q, n_heads, _ = q.shape
            lse = torch.full((b, n_heads, t_q), float("-inf"), dtype=torch.float32, device=q.device)
        else:
            doc_args = None if docs is None else docs.kernel_args()
            o, lse = attn_fwd(q, k, v, off, causal, scale, window, docs=doc_args)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (off, causal, scale, window)
        ctx.docs, ctx.empty = docs, empty
        # An unused output's gradient arrives as None instead of a tensor of zeros.
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        if ctx.empty:
            dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        else:
            do = torch.zeros_like(o) if do is None else do
            doc_args = None if ctx.docs is None else ctx.docs.kernel_args()
            dq, dk, dv = attn_bwd(do, q, k, v, o, lse, *ctx.args, dlse=dlse, docs=doc_args)
        return dq, dk, dv, None, None, None, None, None, None
