"""Native sparse attention (the N mixer's branches): compression, top-k selection, selected attention.

Each op runs its Triton kernel on CUDA (or under `TRITON_INTERPRET=1`) and the plain PyTorch
reference of `naive.py` otherwise; `longctx.kernels.backend("naive" | "triton")` forces one.

- `nsa_compress`: learned block compression of keys or values. Both backends run the same PyTorch
  code (unfold + two matmuls): it is GEMM work that cuBLAS already does at full speed.
- `nsa_cmp_attn`: attention over compressed tokens (`triton/cmp_attn.py`), returns lse.
- `nsa_select_blocks`: block importance + top-k in one kernel (`triton/select_blocks.py`), never storing a
  `T x T / cmp_stride` score tensor.
- `nsa_select_attn`: attention over the listed key blocks, all query heads of a kv group per program
  (`triton/select_attn.py`).
"""

import torch

from longctx.kernels.common.backend import op_backend
from longctx.kernels.common.docs import check_cu_seqlens, doc_bounds
from longctx.kernels.flash_attn.naive import attention_bwd_ref, attention_ref
from longctx.kernels.nsa.naive import (
    cmp_attn_ref,
    compress_ref,
    num_cmp_blocks,
    select_attn_ref,
    select_blocks_ref,
)


def _check_heads(q: torch.Tensor, k: torch.Tensor, what: str) -> None:
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of {what} heads ({k.shape[2]})")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q {tuple(q.shape)} and {what} {tuple(k.shape)} must agree in batch and head dim ([B, T, H, D])"
        )


def _doc_start(q, cu_seqlens, q_offset):
    """`[B, T]` int32 document start of each query (global positions), or None."""
    if cu_seqlens is None:
        return None
    check_cu_seqlens(cu_seqlens, q.shape[0])
    return doc_bounds(cu_seqlens, torch.arange(q_offset, q_offset + q.shape[1], device=q.device))[0]


def nsa_compress(x, pos_emb, w1, w2, cmp_block=32, cmp_stride=16):
    """Compress keys or values block by block.

    Args:
        x: `[B, T, H_kv, D]`.
        pos_emb: `[cmp_block, D]` intra-block position embedding.
        w1: `[hidden, cmp_block * D]`, w2: `[D, hidden]`: the MLP
            `mean(block) + w2 @ silu(w1 @ flatten(block))` with
            `block = x[:, i * cmp_stride : i * cmp_stride + cmp_block] + pos_emb`.
        cmp_block, cmp_stride: block length and the step between blocks.
    Returns:
        `[B, Tc, H_kv, D]`, `Tc = num_cmp_blocks(T, cmp_block, cmp_stride)`.
    """
    return compress_ref(x, pos_emb, w1, w2, cmp_block, cmp_stride)


def nsa_cmp_attn(
    q, k_cmp, v_cmp, cmp_block=32, cmp_stride=16, scale=None, return_lse=False, q_offset=0, cu_seqlens=None
):
    """Attention of each query over the compressed tokens whose block ends at or before it.

    Args:
        q: `[B, T, H, D]`.
        k_cmp, v_cmp: `[B, Tc, H_kv, D]` compressed keys / values (token `i` covers keys
            `[i * cmp_stride, i * cmp_stride + cmp_block)`), `H % H_kv == 0`.
        cmp_block, cmp_stride: the compression geometry: query `t` sees token `i` iff
            `i * cmp_stride + cmp_block - 1 <= q_offset + t`.
        scale: logit scale, `D ** -0.5` when None.
        return_lse: also return the fp32 log-sum-exp `[B, H, T]` (`-inf` where no token is visible).
        q_offset: global position of `q[:, 0]`.
        cu_seqlens: `[B, N + 1]` int32 global document starts per sequence, or None: a query sees only
            compressed tokens whose block starts at or after its document's start (blocks crossing
            a document boundary are masked for both documents).
    Returns:
        `o` `[B, T, H, D]` (zero where no token is visible), or `(o, lse)`.
    """
    _check_heads(q, k_cmp, "k_cmp")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    doc_start = _doc_start(q, cu_seqlens, q_offset)
    if op_backend("nsa", q, k_cmp, v_cmp) != "triton":
        return cmp_attn_ref(q, k_cmp, v_cmp, cmp_block, cmp_stride, scale, return_lse, q_offset, doc_start)
    from longctx.kernels.nsa.triton.cmp_attn import cmp_attn

    o, lse = cmp_attn(
        q, k_cmp.to(q.dtype), v_cmp.to(q.dtype), cmp_block, cmp_stride, scale, q_offset, doc_start
    )
    return (o, lse) if return_lse else o


def nsa_select_blocks(
    q, k_cmp, lse_cmp, cmp_block=32, cmp_stride=16, slc_block=64, slc_top=16, scale=None, q_offset=0,
    cu_seqlens=None,
):  # fmt: skip
    """The selection blocks of each query and kv group, from the compression branch's attention.

    Args:
        q: `[B, T, H, D]`; k_cmp: `[B, Tc, H_kv, D]`; lse_cmp: `[B, H, T]` from `nsa_cmp_attn`.
        cmp_block, cmp_stride: the compression geometry of `k_cmp`.
        slc_block: selection block length; slc_top: blocks chosen per query (block 0 and the two local
            blocks always among them, never a block after the query's).
        scale: the logit scale used for `lse_cmp`.
        q_offset: global position of `q[:, 0]`.
        cu_seqlens: `[B, N + 1]` document starts, or None: only blocks from the first block of the
            query's document on are ranked, and that block is forced in place of block 0.
    Returns:
        `[B, T, H_kv, slc_top]` int32 global block indices, ascending, `-1` for unused slots. Importance
        ties go to the lower block index. Not differentiable.
    """
    _check_heads(q, k_cmp, "k_cmp")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    doc_start = _doc_start(q, cu_seqlens, q_offset)
    if op_backend("nsa", q, k_cmp, lse_cmp) == "triton":
        from longctx.kernels.nsa.triton import select_blocks as kernel

        # With no compressed token yet (T < cmp_block) every importance is 0: nothing to compute.
        if kernel.supported(cmp_block, cmp_stride, slc_block) and k_cmp.shape[1] > 0:
            with torch.no_grad():
                return kernel.select_blocks(
                    q, k_cmp, lse_cmp, cmp_block, cmp_stride, slc_block, slc_top, scale, q_offset, doc_start
                )
    return select_blocks_ref(
        q, k_cmp, lse_cmp, cmp_block, cmp_stride, slc_block, slc_top, scale, q_offset, doc_start
    )


def nsa_select_attn(
    q, k, v, block_idx, block_size=64, scale=None, return_lse=False, q_offset=0, k_offset=0, cu_seqlens=None
):
    """Causal attention of each query over the key blocks listed for its kv group.

    Args:
        q: `[B, T, H, D]`.
        k, v: `[B, Tk, H_kv, D]`, `H % H_kv == 0`.
        block_idx: `[B, T, H_kv, n]` int global key-block indices (block `j` = key positions
            `[j * block_size, (j + 1) * block_size)`), `-1` unused; order and repeats do not matter.
            Keys after the query are masked even when their block is listed.
        block_size: key block length.
        scale: logit scale, `D ** -0.5` when None.
        return_lse: also return the fp32 log-sum-exp `[B, H, T]`.
        q_offset, k_offset: global positions of `q[:, 0]` and `k[:, 0]`.
        cu_seqlens: `[B, N + 1]` document starts, or None: keys before the query's document start
            are masked in every listed block.
    Returns:
        `o` `[B, T, H, D]`, or `(o, lse)`.
    """
    _check_heads(q, k, "k")
    if block_idx.shape[:2] != q.shape[:2] or block_idx.dim() != 4 or block_idx.shape[2] != k.shape[2]:
        raise ValueError(
            f"block_idx must be [B, T, H_kv, n] = [{q.shape[0]}, {q.shape[1]}, {k.shape[2]}, n], "
            f"got {tuple(block_idx.shape)}"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    doc_start = _doc_start(q, cu_seqlens, q_offset)
    if op_backend("nsa", q, k, v, block_idx) != "triton":
        return select_attn_ref(
            q, k, v, block_idx, block_size, scale, return_lse, q_offset, k_offset, doc_start
        )
    from longctx.kernels.nsa.triton.select_attn import select_attn

    o, lse = select_attn(
        q, k.to(q.dtype), v.to(q.dtype), block_idx, block_size, scale, q_offset, k_offset, doc_start
    )
    return (o, lse) if return_lse else o


def _select_on_triton(q, k, v, block_idx) -> bool:
    return op_backend("nsa", q, k, v, block_idx) == "triton"


def _select_ref_mask(block_idx, block_size, t_k, k_offset, n_heads, doc_start, q_offset):
    """`[B, H, T, Tk]` bool: listed blocks, causality and documents (`select_attn_ref`'s mask; the
    membership is built without reading the indices on the host)."""
    b, t, n_kv, _ = block_idx.shape
    key_block = (torch.arange(t_k, device=block_idx.device) + k_offset) // block_size
    member = (block_idx.long()[..., None] == key_block).any(dim=-2)  # [B, T, H_kv, Tk]
    mask = member.repeat_interleave(n_heads // n_kv, dim=2, output_size=n_heads).permute(0, 2, 1, 3)
    k_pos = torch.arange(t_k, device=block_idx.device) + k_offset
    q_pos = torch.arange(t, device=block_idx.device) + q_offset
    mask = mask & (k_pos[None, :] <= q_pos[:, None])
    if doc_start is not None:
        mask = mask & (k_pos[None, None, None, :] >= doc_start[:, None, :, None])
    return mask


def nsa_select_attn_chunk_fwd(
    q, k, v, block_idx, block_size, q_offset, k_offset, cu_seqlens=None, scale=None
):
    """`(o, lse)` of `nsa_select_attn` without autograd, over the keys `[k_offset, k_offset + Tk)` only:
    blocks listed in `block_idx` (global ids) outside them are skipped, so a context-parallel rank can
    attend one peer's chunk at a time and merge by lse. Arguments as `nsa_select_attn`."""
    _check_heads(q, k, "k")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    doc_start = _doc_start(q, cu_seqlens, q_offset)
    with torch.no_grad():
        if _select_on_triton(q, k, v, block_idx):
            from longctx.kernels.nsa.triton.select_attn import normalize_block_idx, select_attn_fwd

            k, v = (x.to(q.dtype).contiguous() for x in (k, v))
            idx = normalize_block_idx(block_idx, block_size, k.shape[1], q_offset, k_offset)
            return select_attn_fwd(
                q.contiguous(), k, v, idx, block_size, scale, q_offset, k_offset, doc_start
            )
        mask = _select_ref_mask(block_idx, block_size, k.shape[1], k_offset, q.shape[2], doc_start, q_offset)
        return attention_ref(q, k, v, causal=False, scale=scale, return_lse=True, mask=mask)


def nsa_select_attn_chunk_bwd(
    do, q, k, v, o, lse, block_idx, block_size, q_offset, k_offset, cu_seqlens=None, scale=None
):
    """`(dq, dk, dv)` of one key chunk given the output and lse of the WHOLE row (all chunks merged):
    this chunk's exact share of the gradient. Arguments as `nsa_select_attn_chunk_fwd`."""
    _check_heads(q, k, "k")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    doc_start = _doc_start(q, cu_seqlens, q_offset)
    if _select_on_triton(q, k, v, block_idx):
        from longctx.kernels.nsa.triton.select_attn import normalize_block_idx, select_attn_bwd

        k_dtype = k.dtype
        k, v = (x.to(q.dtype).contiguous() for x in (k, v))
        idx = normalize_block_idx(block_idx, block_size, k.shape[1], q_offset, k_offset)
        dq, dk, dv = select_attn_bwd(
            q.contiguous(), k, v, idx, o.to(q.dtype).contiguous(), lse.float().contiguous(),
            do.to(q.dtype).contiguous(), None, block_size, scale, q_offset, k_offset, doc_start,
        )  # fmt: skip
        return dq, dk.to(k_dtype), dv.to(k_dtype)
    mask = _select_ref_mask(block_idx, block_size, k.shape[1], k_offset, q.shape[2], doc_start, q_offset)
    return attention_bwd_ref(do, q, k, v, o, lse, causal=False, scale=scale, mask=mask)


__all__ = [
    "nsa_select_attn_chunk_bwd",
    "nsa_select_attn_chunk_fwd",
    "nsa_compress",
    "nsa_cmp_attn",
    "nsa_select_blocks",
    "nsa_select_attn",
    "num_cmp_blocks",
    "compress_ref",
    "cmp_attn_ref",
    "select_blocks_ref",
    "select_attn_ref",
]
