"""Dense softmax attention (the D mixer, NSA's window branch, ring attention's building block):
`flash_attn` for a whole sequence, the chunk-pair entry points ring attention is built from
(`flash_attn_chunk`, `flash_attn_chunk_fwd`, `flash_attn_chunk_bwd`, at global offsets), and the lse
merge of partial results (`merge_partials`).

    o = flash_attn(q, k, v)                                   # causal, [B, T, H, D]
    o, lse = flash_attn_chunk(q, k, v, q_offset=1024, k_offset=0)
    o, lse = merge_partials([o_a, o_b], [lse_a, lse_b])

Each op runs the Triton kernels (`triton.py`: launchers and the autograd Function) on CUDA or under
`TRITON_INTERPRET=1`, and the plain PyTorch reference (`naive.py`) elsewhere;
`longctx.kernels.backend("naive" | "triton")` forces one, and `backend("flex")` runs them through
FlexAttention (`longctx.kernels.flex`, fp64 included). On the reference, `flash_attn` and
`flash_attn_chunk` differentiate `attention_ref` by autograd and `flash_attn_chunk_bwd` runs the
explicit `attention_bwd_ref` (no autograd graph, as ring attention needs). fp64 inputs always take the
reference (the kernels compute in fp32). The kernel module is imported on first use, so that it is
built for the mode (compiled or interpreted) the process runs in.
"""

import torch

from longctx.kernels import flex
from longctx.kernels.common.backend import op_backend
from longctx.kernels.common.docs import check_cu_seqlens, doc_bounds
from longctx.kernels.flash_attn.naive import attention_bwd_ref, attention_ref, merge_partials_ref


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [B, T, H, D], got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and head dim")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")


def _where(*tensors: torch.Tensor) -> str:
    """'triton', 'flex' or 'naive' for these inputs (fp64 never takes the Triton kernels)."""
    where = op_backend("flash", *tensors)
    return "naive" if where == "triton" and tensors[0].dtype == torch.float64 else where


class _Docs:
    """Document bounds of one (query chunk, key chunk) pair from `cu_seqlens`: for the kernels, per
    query the first key index it may see (its document's start) and per key the query index past its
    document's end; for the reference, the `[B, 1, Tq, Tk]` same-document mask."""

    def __init__(self, cu_seqlens, t_q, t_k, q_offset, k_offset, causal, device):
        if not causal:
            raise ValueError("cu_seqlens (document masking) needs causal=True")
        self.cu_seqlens = cu_seqlens
        self.q_pos = torch.arange(q_offset, q_offset + t_q, device=device)
        self.k_pos = torch.arange(k_offset, k_offset + t_k, device=device)
        self.q_offset, self.k_offset = q_offset, k_offset

    def kernel_args(self) -> tuple[torch.Tensor, torch.Tensor]:
        q_start, _ = doc_bounds(self.cu_seqlens, self.q_pos)
        _, k_end = doc_bounds(self.cu_seqlens, self.k_pos)
        return q_start - self.k_offset, k_end - self.q_offset

    def q_start(self) -> torch.Tensor:
        """`[B, Tq]` the global position of each query's document start (FlexAttention's mask)."""
        return doc_bounds(self.cu_seqlens, self.q_pos)[0]

    def mask(self) -> torch.Tensor:
        q_start, _ = doc_bounds(self.cu_seqlens, self.q_pos)
        k_start, _ = doc_bounds(self.cu_seqlens, self.k_pos)
        return (q_start[:, :, None] == k_start[:, None, :])[:, None]


def _docs(cu_seqlens, q, k, q_offset, k_offset, causal):
    if cu_seqlens is None:
        return None
    check_cu_seqlens(cu_seqlens, q.shape[0])
    return _Docs(cu_seqlens, q.shape[1], k.shape[1], q_offset, k_offset, causal, q.device)


def _q_start(docs):
    return None if docs is None else docs.q_start()


def _pair_is_empty(
    t_q: int, t_k: int, q_offset: int, k_offset: int, causal: bool, window: int | None
) -> bool:
    """True when no query of the chunk pair sees any of its keys (nothing to compute)."""
    if t_q == 0 or t_k == 0:
        return True
    if causal and k_offset > q_offset + t_q - 1:
        return True
    return window is not None and k_offset + t_k - 1 <= q_offset - window


def _forward(q, k, v, q_offset, k_offset, causal, scale, window, where, docs=None):
    if _pair_is_empty(q.shape[1], k.shape[1], q_offset, k_offset, causal, window):
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        b, t_q, n_heads, _ = q.shape
        return torch.zeros_like(q), torch.full(
            (b, n_heads, t_q), float("-inf"), dtype=lse_dtype, device=q.device
        )
    if where == "flex":
        mask = flex.dense_mask(q_offset, k_offset, causal, window, q.device, _q_start(docs))
        return flex.forward(q, k, v, mask, scale)
    if where == "triton":
        from longctx.kernels.flash_attn.triton import attn_fwd

        doc_args = None if docs is None else docs.kernel_args()
        return attn_fwd(q, k, v, q_offset - k_offset, causal, scale, window, docs=doc_args)
    return attention_ref(
        q, k, v, causal, scale, window, return_lse=True, q_offset=q_offset, k_offset=k_offset,
        mask=None if docs is None else docs.mask(),
    )  # fmt: skip


def _backward(do, q, k, v, o, lse, q_offset, k_offset, causal, scale, window, dlse, where, docs=None):
    if _pair_is_empty(q.shape[1], k.shape[1], q_offset, k_offset, causal, window):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if where == "flex":
        mask = flex.dense_mask(q_offset, k_offset, causal, window, q.device, _q_start(docs))
        return flex.backward(do, q, k, v, o, lse, mask, scale, dlse)
    if where == "triton":
        from longctx.kernels.flash_attn.triton import attn_bwd

        doc_args = None if docs is None else docs.kernel_args()
        return attn_bwd(
            do, q, k, v, o, lse, q_offset - k_offset, causal, scale, window, dlse=dlse, docs=doc_args
        )
    return attention_bwd_ref(
        do, q, k, v, o, lse, q_offset, k_offset, causal, scale, window, dlse=dlse,
        mask=None if docs is None else docs.mask(),
    )  # fmt: skip


def _attention(q, k, v, q_offset, k_offset, causal, scale, window, return_lse, cu_seqlens=None):
    _validate(q, k, v, window)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q_offset, k_offset = int(q_offset), int(k_offset)
    docs = _docs(cu_seqlens, q, k, q_offset, k_offset, causal)
    where = _where(q, k, v)
    if where == "flex":
        mask = flex.dense_mask(q_offset, k_offset, causal, window, q.device, _q_start(docs))
        o, lse = flex.attention(q, k, v, mask, scale)
        return (o, lse) if return_lse else o
    if where == "triton":
        from longctx.kernels.flash_attn.triton import FlashAttnFunction

        empty = _pair_is_empty(q.shape[1], k.shape[1], q_offset, k_offset, causal, window)
        o, lse = FlashAttnFunction.apply(q, k, v, q_offset - k_offset, causal, scale, window, docs, empty)
        return (o, lse) if return_lse else o
    # The reference under autograd: on CPU this beats the explicit backward, which recomputes the scores.
    mask = None if docs is None else docs.mask()
    return attention_ref(q, k, v, causal, scale, window, return_lse, q_offset, k_offset, mask=mask)


def flash_attn_chunk(q, k, v, q_offset, k_offset, causal=True, scale=None, window=None, cu_seqlens=None):
    """Attention of a query chunk over a key chunk at global positions, differentiable in `o` and `lse`.

    Query row `i` sits at position `q_offset + i`, key `j` at `k_offset + j`; query `i` sees key `j` iff
    `(not causal or k_pos <= q_pos) and (window is None or k_pos > q_pos - window)`. A pair where no
    query sees any key is skipped (no launch): `o = 0`, `lse = -inf`, zero gradients.

    Args:
        q: `[B, Tq, H, D]`; k, v: `[B, Tk, H_kv, D]` with `H % H_kv == 0`.
        q_offset, k_offset: global positions of the first query and the first key.
        causal, scale, window, cu_seqlens: as `flash_attn` (document offsets are global positions).
    Returns:
        `(o, lse)`: `o` `[B, Tq, H, D]` in q's dtype, `lse` `[B, H, Tq]` fp32 (`-inf` for rows that see
        no key, whose `o` is 0). Merge chunks over disjoint keys with `merge_partials`.
    """
    return _attention(q, k, v, q_offset, k_offset, causal, scale, window, True, cu_seqlens)


def flash_attn(q, k, v, causal=True, scale=None, window=None, return_lse=False, cu_seqlens=None):
    """Dense softmax attention in FlashAttention's layout.

    Args:
        q: `[B, T, H, D]` queries.
        k, v: `[B, T, H_kv, D]` keys and values, `H % H_kv == 0` (GQA: query head `h` reads kv head
            `h // (H // H_kv)`).
        causal: mask keys after each query.
        scale: logit scale, `D ** -0.5` when None.
        window: sliding window; query `i` sees keys `j` with `i - window < j` (and `j <= i` if causal).
        return_lse: also return the fp32 log-sum-exp `[B, H, T]` (differentiable too).
        cu_seqlens: `[B, N + 1]` int32 document start offsets per sequence (`kernels.common.docs`), or
            None: a query sees only keys of its own document (causal only); the window stops at the
            document start. Key tiles before the query tile's first document are never visited.
    Returns:
        `o` `[B, T, H, D]` in `q.dtype`, or `(o, lse)`. Rows that see no key give `o = 0`, `lse = -inf`.
    """
    return _attention(q, k, v, 0, 0, causal, scale, window, return_lse, cu_seqlens)


def flash_attn_chunk_fwd(q, k, v, q_offset, k_offset, causal=True, scale=None, window=None, cu_seqlens=None):
    """Forward of `flash_attn_chunk` without autograd (ring attention drives its own backward).

    Args:
        q: `[B, Tq, H, D]`; k, v: `[B, Tk, H_kv, D]`; q_offset, k_offset: global positions.
        causal, scale, window: as `flash_attn`.
    Returns:
        `(o, lse)` as `flash_attn_chunk`.
    """
    _validate(q, k, v, window)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    docs = _docs(cu_seqlens, q, k, int(q_offset), int(k_offset), causal)
    with torch.no_grad():
        return _forward(q, k, v, int(q_offset), int(k_offset), causal, scale, window, _where(q, k, v), docs)


def flash_attn_chunk_bwd(
    do, q, k, v, o, lse, q_offset, k_offset, causal=True, scale=None, window=None, dlse=None, cu_seqlens=None
):
    """Gradients of one chunk pair, given the output and lse of the WHOLE row.

    In ring attention's backward, each (query chunk, key chunk) pair recomputes its probabilities as
    `exp(S - lse)` with the final merged `lse`, and uses the final `o` in `rowsum(dO * O)`; the
    pair's dq, dk, dv are then its exact share of the full gradient (sum them over key chunks / query
    chunks). Passing the pair's own `o`, `lse` gives the pair's standalone gradients.

    Args:
        do: `[B, Tq, H, D]` gradient of the (merged) output.
        q: `[B, Tq, H, D]`; k, v: `[B, Tk, H_kv, D]`.
        o: `[B, Tq, H, D]` merged output; lse: `[B, H, Tq]` merged log-sum-exp.
        q_offset, k_offset, causal, scale, window: as `flash_attn_chunk`.
        dlse: optional `[B, H, Tq]` gradient of the merged lse.
    Returns:
        `(dq, dk, dv)`: dq `[B, Tq, H, D]`, dk and dv `[B, Tk, H_kv, D]` (summed over each GQA group),
        in the dtypes of q, k, v. Zero for a pair where no query sees any key.
    """
    _validate(q, k, v, window)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    where = _where(q, k, v, do)
    docs = _docs(cu_seqlens, q, k, int(q_offset), int(k_offset), causal)
    with torch.no_grad():
        return _backward(
            do, q, k, v, o, lse, int(q_offset), int(k_offset), causal, scale, window, dlse, where, docs
        )


class MergePartialsFunction(torch.autograd.Function):
    """`lse = logsumexp_c lse_c`, `o = sum_c w_c o_c` with `w_c = exp(lse_c - lse)`, in fp32.

    Backward: `dO_c = w_c dO` and `dlse_c = w_c (<dO, O_c> - <dO, O> + dlse)` per row, where
    `<dO, O> = sum_c w_c <dO, O_c>`. A chunk with `lse_c = -inf` has `w_c = 0`, so it drops out of
    both directions, and rows where every chunk is empty give `o = 0`, `lse = -inf`, zero gradients.
    """

    @staticmethod
    def forward(ctx, n_chunks, *tensors):
        outs, lses = tensors[:n_chunks], tensors[n_chunks:]
        work = torch.float64 if lses[0].dtype == torch.float64 else torch.float32
        stacked = torch.stack([x.to(work) for x in lses])  # [C, B, H, T]
        lse = torch.logsumexp(stacked, dim=0)  # -inf where every chunk is -inf
        weights = torch.exp(stacked - lse.masked_fill(torch.isneginf(lse), 0.0))  # [C, B, H, T]
        o = sum(w.transpose(1, 2)[..., None] * o_c.to(work) for w, o_c in zip(weights, outs))
        ctx.save_for_backward(weights, *outs)
        ctx.lse_dtypes = [x.dtype for x in lses]
        ctx.set_materialize_grads(False)
        return o.to(outs[0].dtype), lse

    @staticmethod
    def backward(ctx, do, dlse):
        weights, *outs = ctx.saved_tensors
        work = weights.dtype
        dots = torch.zeros_like(weights)
        douts = [None] * len(outs)
        if do is not None:
            do_w = do.to(work)
            dots = torch.stack(
                [(do_w * o_c.to(work)).sum(-1).transpose(1, 2) for o_c in outs]
            )  # [C, B, H, T]
            douts = [(w.transpose(1, 2)[..., None] * do_w).to(o_c.dtype) for w, o_c in zip(weights, outs)]
        centred = dots - (weights * dots).sum(0)
        if dlse is not None:
            centred = centred + dlse.to(work)
        dlses = [(w * c).to(dt) for w, c, dt in zip(weights, centred, ctx.lse_dtypes)]
        return None, *douts, *dlses


def merge_partials(outs, lses):
    """Merge attention results over disjoint key sets (differentiable in every input).

    Args:
        outs: list of `[B, T, H, D]` partial outputs; lses: list of `[B, H, T]` their log-sum-exps
            (`-inf` for rows that saw no key in that chunk: they drop out).
    Returns:
        `(o, lse)`: `o = sum_c exp(lse_c - lse) o_c` in the dtype of `outs[0]`,
        `lse = logsumexp_c lse_c` in fp32 (fp64 for fp64 inputs); the weighting runs in fp32.
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError(
            f"merge_partials needs matching non-empty lists, got {len(outs)} outs, {len(lses)} lses"
        )
    return MergePartialsFunction.apply(len(outs), *outs, *lses)


__all__ = [
    "flash_attn",
    "flash_attn_chunk",
    "flash_attn_chunk_fwd",
    "flash_attn_chunk_bwd",
    "merge_partials",
    "attention_ref",
    "attention_bwd_ref",
    "merge_partials_ref",
]
