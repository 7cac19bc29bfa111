"""S2 strided head-sharded block-sparse attention (the S mixer).

`s2_attn` runs the Triton kernels (`triton.py`) on CUDA or under `TRITON_INTERPRET=1`, and the
plain PyTorch reference (`naive.py`) elsewhere. The Triton module is imported on first use, so this
package imports on any machine and the interpreter setting is read when a kernel is first needed.
"""

import torch

from longctx.kernels import flex
from longctx.kernels.common import get_backend
from longctx.kernels.common.backend import op_backend, use_triton
from longctx.kernels.common.docs import check_cu_seqlens, doc_bounds
from longctx.kernels.flash_attn.naive import attention_bwd_ref
from longctx.kernels.s2_attn.blocks import check_block_ids, check_block_table
from longctx.kernels.s2_attn.naive import (
    s2_attn_ref,
    s2_attn_table_ref,
    s2_block_mask,
    s2_ref_mask,
    s2_table_mask,
    s2_token_mask,
    table_keys,
    token_positions,
)


def _check_args(q, k, v, block_size, local_blocks, vert_stride, dense_heads):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got shapes {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"k and v must share one shape [B, T, H_kv, D] with q's B and D; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    for name, value in (
        ("block_size", block_size),
        ("local_blocks", local_blocks),
        ("vert_stride", vert_stride),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0 <= dense_heads <= q.shape[2]:
        raise ValueError(
            f"dense_heads must be in [0, {q.shape[2]}] (the number of query heads), got {dense_heads}"
        )


def _table_form(q, k, v, k_block_ids, block_size):
    """`(k, v, table)` of a per-kv-head block buffer: `k`, `v` `[B, H_kv, n, block_size, D]` as
    `[B, n * block_size, H_kv, D]` views (what the kernels index) and the checked `[H_kv, n]` table."""
    if k.shape != v.shape or k.shape[3] != block_size:
        raise ValueError(
            f"per-kv-head key buffers must be k, v of one shape [B, H_kv, n, block_size={block_size}, D]; "
            f"got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k_block_ids is None:
        raise ValueError(
            "a [B, H_kv, n, block_size, D] key buffer needs its block table: pass k_block_ids as "
            "[H_kv, n] global block ids (-1 for unused slots)"
        )
    table = check_block_table(k_block_ids, k.shape[2])
    if table.shape[0] != k.shape[1]:
        raise ValueError(
            f"k_block_ids has {table.shape[0]} rows for {k.shape[1]} kv heads; give one row per kv head"
        )
    # flatten() views whenever a block's rows are evenly spaced (any exchange layout); else it copies.
    return k.flatten(2, 3).transpose(1, 2), v.flatten(2, 3).transpose(1, 2), table


def _triton_limits(q, k, block_size) -> str | None:
    """Why the Triton kernels cannot take these inputs, or None when they can."""
    if block_size < 16 or block_size & (block_size - 1):
        return (
            f"block_size must be a power of two >= 16 for the Triton kernels (tile shapes), got {block_size}"
        )
    if q.shape[3] > 256:
        return f"head dim must be <= 256 for the Triton kernels, got {q.shape[3]}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the Triton kernels take fp16, bf16 or fp32, got {q.dtype}"
    if q.shape[1] == 0 or k.shape[1] == 0:
        return "empty sequences"
    return None


def s2_attn(
    q,
    k,
    v,
    block_size=64,
    local_blocks=8,
    vert_stride=16,
    dense_heads=0,
    scale=None,
    return_lse=False,
    q_block_ids=None,
    k_block_ids=None,
    cu_seqlens=None,
):
    """S2 sparse causal attention (DESIGN.md): each head sees a local window plus a strided set of blocks.

    Args:
        q: `[B, Tq, H, D]` queries.
        k, v: `[B, Tk, H_kv, D]` keys and values, `H % H_kv == 0` (GQA: head `h` reads kv head
            `h // (H // H_kv)`); or per-kv-head key blocks `[B, H_kv, n, block_size, D]` with a block
            table in `k_block_ids` (below).
        block_size: tokens per block (the Triton kernels take powers of two >= 16; other sizes use
            the reference).
        local_blocks: blocks of the local window, the diagonal block included.
        vert_stride: every `vert_stride`-th block is visible, at an offset that differs by head.
        dense_heads: the last `dense_heads` heads attend densely (causal).
        scale: logit scale, `D ** -0.5` when None.
        return_lse: also return the log-sum-exp `[B, H, Tq]` (fp32; differentiable, so partial results
            can be merged and trained through).
        q_block_ids, k_block_ids: optional int tensors `[ceil(T / block_size)]`, strictly increasing:
            the global block index of each consecutive `block_size`-token block of q / k (default
            `0..n-1`, a whole sequence). With them a context-parallel rank passes its (zigzag) query
            shard and any gathered set of key blocks and gets exactly those rows of the full S2
            attention restricted to those keys. Only the global last block may be partial. Pass
            them as CPU tensors (or lists): they key the cached block lists, and CUDA ids cost a sync.
            With 5-D `k`, `v`, `k_block_ids` is a `[H_kv, n]` table instead: kv head `g`'s slot `s`
            holds global block `k_block_ids[g, s]`, ascending, `-1` (unused, never read) after the
            used slots. Each kv head then reads only its own blocks (context parallelism fetches
            different blocks for different kv heads). Blocks are whole; rows past the end of the
            sequence must be finite (causality masks them).
        cu_seqlens: `[B, N + 1]` int32 global document start offsets per sequence
            (`kernels.common.docs`), or None: a query attends only keys of its own document. The
            pattern stays in global block positions; blocks outside the document are skipped.
    Returns:
        `o` `[B, Tq, H, D]` in q's dtype, or `(o, lse)`. Rows that see no key give `o = 0`,
        `lse = -inf`.
    """
    if k.dim() == 5:
        return _s2_attn_table(
            q, k, v, block_size, local_blocks, vert_stride, dense_heads, scale, return_lse, q_block_ids,
            k_block_ids, cu_seqlens,
        )  # fmt: skip
    _check_args(q, k, v, block_size, local_blocks, vert_stride, dense_heads)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q_block_ids is not None:
        q_block_ids = check_block_ids(q_block_ids, q.shape[1], block_size, "q_block_ids")
    if k_block_ids is not None:
        k_block_ids = check_block_ids(k_block_ids, k.shape[1], block_size, "k_block_ids")
    doc_start = None
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, q.shape[0])
        q_pos = token_positions(q.shape[1], block_size, 0, q_block_ids, q.device)
        doc_start = doc_bounds(cu_seqlens, q_pos)[0]  # [B, Tq]
    where = op_backend("s2", q, k, v)
    if where == "flex":
        q_pos = token_positions(q.shape[1], block_size, 0, q_block_ids, q.device)
        k_pos = token_positions(k.shape[1], block_size, 0, k_block_ids, q.device)
        mask = flex.s2_mask(
            q.shape[2], block_size, local_blocks, vert_stride, dense_heads, q_pos, k_pos, doc_start
        )
        o, lse = flex.attention(q, k, v, mask, scale, per_head=True)
        return (o, lse) if return_lse else o
    reason = _triton_limits(q, k, block_size)
    if reason is not None and get_backend() == "triton":
        raise ValueError(f"the Triton backend was forced but cannot run: {reason}")
    if reason is None and where == "triton":
        from longctx.kernels.s2_attn.triton import s2_attn_triton

        o, lse = s2_attn_triton(
            q, k, v, block_size, local_blocks, vert_stride, dense_heads, scale, q_block_ids, k_block_ids,
            doc_start=doc_start,
        )  # fmt: skip
        return (o, lse) if return_lse else o
    return s2_attn_ref(
        q,
        k,
        v,
        block_size,
        local_blocks,
        vert_stride,
        dense_heads,
        scale=scale,
        return_lse=return_lse,
        q_block_ids=q_block_ids,
        k_block_ids=k_block_ids,
        cu_seqlens=cu_seqlens,
    )


def _s2_attn_table(
    q, k, v, block_size, local_blocks, vert_stride, dense_heads, scale, return_lse, q_block_ids, k_table,
    cu_seqlens,
):  # fmt: skip
    """`s2_attn` over per-kv-head key blocks (5-D `k`, `v`): the Triton kernels where they run (the
    flex backend has no per-head key sets, so it takes them too), else the reference."""
    k4, v4, table = _table_form(q, k, v, k_table, block_size)
    _check_args(q, k4, v4, block_size, local_blocks, vert_stride, dense_heads)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_ids, _, doc_start = _chunk_args(q, k4, block_size, q_block_ids, None, cu_seqlens)
    if _chunk_on_triton(q, k4, v4, block_size):
        from longctx.kernels.s2_attn.triton import s2_attn_triton

        o, lse = s2_attn_triton(
            q, k4, v4, block_size, local_blocks, vert_stride, dense_heads, scale, q_ids, table,
            doc_start=doc_start,
        )  # fmt: skip
        return (o, lse) if return_lse else o
    return s2_attn_table_ref(
        q, k, v, table, block_size, local_blocks, vert_stride, dense_heads, scale=scale,
        return_lse=return_lse, q_block_ids=q_ids, cu_seqlens=cu_seqlens,
    )  # fmt: skip


def _chunk_on_triton(q, k, v, block_size) -> bool:
    """Whether the chunk entry points run the Triton kernels (the flex backend has no external-lse
    backward, so it takes them too where they can run: CUDA or the interpreter)."""
    where = op_backend("s2", q, k, v)
    if where == "naive" or (where == "flex" and not use_triton(q, k, v)):
        return False
    reason = _triton_limits(q, k, block_size)
    if reason is not None and get_backend() == "triton":
        raise ValueError(f"the Triton backend was forced but cannot run: {reason}")
    return reason is None


def _chunk_args(q, k, block_size, q_block_ids, k_block_ids, cu_seqlens):
    q_ids = check_block_ids(q_block_ids, q.shape[1], block_size, "q_block_ids")
    k_ids = check_block_ids(k_block_ids, k.shape[1], block_size, "k_block_ids")
    doc_start = None
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, q.shape[0])
        doc_start = doc_bounds(cu_seqlens, token_positions(q.shape[1], block_size, 0, q_ids, q.device))[0]
    return q_ids, k_ids, doc_start


def s2_attn_chunk_fwd(
    q, k, v, block_size, local_blocks, vert_stride, dense_heads, q_block_ids, k_block_ids, cu_seqlens=None,
    scale=None,
):  # fmt: skip
    """`(o, lse)` of `s2_attn` without autograd, for callers that drive their own backward (context
    parallelism merges several key sets by lse, then calls `s2_attn_chunk_bwd` per key set).

    Arguments as `s2_attn` (block ids as CPU tensors; 5-D `k`, `v` with a `[H_kv, n]` block table in
    `k_block_ids`). `o` is in q's dtype, `lse` `[B, H, Tq]` fp32 (fp64 for fp64 inputs on the
    reference); rows that see no key give `o = 0`, `lse = -inf`.
    """
    if k.dim() == 5:
        with torch.no_grad():
            return _s2_attn_table(
                q, k, v, block_size, local_blocks, vert_stride, dense_heads, scale, True, q_block_ids,
                k_block_ids, cu_seqlens,
            )  # fmt: skip
    _check_args(q, k, v, block_size, local_blocks, vert_stride, dense_heads)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_ids, k_ids, doc_start = _chunk_args(q, k, block_size, q_block_ids, k_block_ids, cu_seqlens)
    with torch.no_grad():
        if _chunk_on_triton(q, k, v, block_size):
            from longctx.kernels.s2_attn.triton import _last_dim_contiguous, s2_attn_fwd, s2_block_lists

            t_q, t_k = q.shape[1], k.shape[1]
            q, k, v = (_last_dim_contiguous(x.to(q.dtype)) for x in (q, k, v))
            lists = s2_block_lists(
                q.shape[2],
                q_ids,
                k_ids,
                local_blocks,
                vert_stride,
                dense_heads,
                q.device,
                block_size,
                t_q,
                t_k,
            )
            return s2_attn_fwd(q, k, v, lists, block_size, scale, None, doc_start)
        return s2_attn_ref(
            q, k, v, block_size, local_blocks, vert_stride, dense_heads, scale=scale, return_lse=True,
            q_block_ids=q_ids, k_block_ids=k_ids, cu_seqlens=cu_seqlens,
        )  # fmt: skip


def s2_attn_chunk_bwd(
    do, q, k, v, o, lse, block_size, local_blocks, vert_stride, dense_heads, q_block_ids, k_block_ids,
    cu_seqlens=None, scale=None,
):  # fmt: skip
    """`(dq, dk, dv)` of one key set given the output `o` and `lse` of the WHOLE row (all key sets
    merged): probabilities are `exp(S - lse)`, so the result is this key set's exact share of the full
    gradient (sum dq over key sets). Arguments as `s2_attn_chunk_fwd`; results in q's / k's dtypes,
    dk and dv in k's shape (5-D with a block table: zero in unused slots).
    """
    if k.dim() == 5:
        return _chunk_bwd_table(
            do, q, k, v, o, lse, block_size, local_blocks, vert_stride, dense_heads, q_block_ids,
            k_block_ids, cu_seqlens, scale,
        )  # fmt: skip
    _check_args(q, k, v, block_size, local_blocks, vert_stride, dense_heads)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_ids, k_ids, doc_start = _chunk_args(q, k, block_size, q_block_ids, k_block_ids, cu_seqlens)
    if _chunk_on_triton(q, k, v, block_size):
        from longctx.kernels.s2_attn.triton import _last_dim_contiguous, s2_attn_bwd, s2_block_lists

        t_q, t_k = q.shape[1], k.shape[1]
        k_dtype = k.dtype
        q, k, v, do = (_last_dim_contiguous(x.to(q.dtype)) for x in (q, k, v, do))
        lists = s2_block_lists(
            q.shape[2], q_ids, k_ids, local_blocks, vert_stride, dense_heads, q.device, block_size, t_q, t_k
        )
        dq, dk, dv = s2_attn_bwd(
            do, None, q, k, v, o.to(q.dtype).contiguous(), lse.float().contiguous(), lists, block_size,
            scale, None, doc_start,
        )  # fmt: skip
        return dq, dk.to(k_dtype), dv.to(k_dtype)
    mask = s2_ref_mask(
        q.shape[2], q.shape[1], k.shape[1], block_size, local_blocks, vert_stride, dense_heads,
        q_block_ids=q_ids, k_block_ids=k_ids, cu_seqlens=cu_seqlens, device=q.device,
    )  # fmt: skip
    return attention_bwd_ref(do, q, k, v, o, lse, causal=False, scale=scale, mask=mask)


def _chunk_bwd_table(
    do, q, k, v, o, lse, block_size, local_blocks, vert_stride, dense_heads, q_block_ids, k_table,
    cu_seqlens, scale,
):  # fmt: skip
    b, n_kv, n, bs, d = k.shape
    k4, v4, table = _table_form(q, k, v, k_table, block_size)
    _check_args(q, k4, v4, block_size, local_blocks, vert_stride, dense_heads)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_ids, _, doc_start = _chunk_args(q, k4, block_size, q_block_ids, None, cu_seqlens)
    if _chunk_on_triton(q, k4, v4, block_size):
        from longctx.kernels.s2_attn.triton import _last_dim_contiguous, s2_attn_bwd, s2_block_lists

        k_dtype = k.dtype
        q, k4, v4, do = (_last_dim_contiguous(x.to(q.dtype)) for x in (q, k4, v4, do))
        lists = s2_block_lists(
            q.shape[2], q_ids, table, local_blocks, vert_stride, dense_heads, q.device, block_size,
            q.shape[1], n * bs,
        )  # fmt: skip
        dq, dk, dv = s2_attn_bwd(
            do, None, q, k4, v4, o.to(q.dtype).contiguous(), lse.float().contiguous(), lists, block_size,
            scale, None, doc_start,
        )  # fmt: skip
        # [B, n * bs, H_kv, D] -> k's [B, H_kv, n, bs, D] (a view).
        dk, dv = (x.to(k_dtype).unflatten(1, (n, bs)).permute(0, 3, 1, 2, 4) for x in (dk, dv))
        return dq, dk, dv
    mask = s2_table_mask(
        q.shape[2], q.shape[1], table, block_size, local_blocks, vert_stride, dense_heads, q_ids, cu_seqlens,
        q.device,
    )  # fmt: skip
    h = q.shape[2]
    dq, dk, dv = attention_bwd_ref(
        do, q, table_keys(k, h), table_keys(v, h), o, lse, causal=False, scale=scale, mask=mask
    )
    # Per query head [B, n * bs, H, D] -> summed over each GQA group, [B, H_kv, n, bs, D].
    group = h // n_kv
    dk, dv = (x.transpose(1, 2).unflatten(2, (n, bs)).unflatten(1, (n_kv, group)).sum(2) for x in (dk, dv))
    return dq, dk, dv


__all__ = [
    "s2_attn", "s2_attn_chunk_bwd", "s2_attn_chunk_fwd", "s2_attn_ref", "s2_block_mask", "s2_token_mask",
]  # fmt: skip
