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
from longctx.kernels.s2_attn.blocks import check_block_ids
from longctx.kernels.s2_attn.naive import (
    s2_attn_ref,
    s2_block_mask,
    s2_ref_mask,
    s2_token_mask,
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
            `h // (H // H_kv)`).
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
        cu_seqlens: `[B, N + 1]` int32 global document start offsets per sequence
            (`kernels.common.docs`), or None: a query attends only keys of its own document. The
            pattern stays in global block positions; blocks outside the document are skipped.
    Returns:
        `o` `[B, Tq, H, D]` in q's dtype, or `(o, lse)`. Rows that see no key give `o = 0`,
        `lse = -inf`.
    """
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

    Arguments as `s2_attn` (block ids as CPU tensors). `o` is in q's dtype, `lse` `[B, H, Tq]` fp32
    (fp64 for fp64 inputs on the reference); rows that see no key give `o = 0`, `lse = -inf`.
    """
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
    gradient (sum dq over key sets). Arguments as `s2_attn_chunk_fwd`; results in q's / k's dtypes.
    """
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


__all__ = [
    "s2_attn", "s2_attn_chunk_bwd", "s2_attn_chunk_fwd", "s2_attn_ref", "s2_block_mask", "s2_token_mask",
]  # fmt: skip
