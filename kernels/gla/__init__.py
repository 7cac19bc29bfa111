"""Gated linear attention with state in and out (the L mixer).

`gated_linear_attn` runs the chunked Triton kernels (`chunk.py`) on CUDA or under `TRITON_INTERPRET=1`
and the PyTorch reference (`naive.py`) elsewhere; `gated_linear_attn_step` is the one-token
recurrence for decoding. The Triton module is imported on first use, so that `TRITON_INTERPRET` set
after `longctx.kernels` was imported still takes effect.
"""

import torch

from longctx.kernels.common.backend import op_backend
from longctx.kernels.common.docs import check_cu_seqlens, doc_starts_mask
from longctx.kernels.common.linear import check_linear_args
from longctx.kernels.gla.naive import gla_chunk_ref, gla_recurrent_ref, gla_step_ref

# The log-decay given to a document's first token: exp(RESET_LOG_DECAY) is exactly 0 in fp32, so the
# state entering the document is dropped, while every within-chunk cumulative log-decay stays far
# from overflow (the kernel sums them in fp64, at most 128 resets a chunk).
RESET_LOG_DECAY = -1.0e4


def reset_at_documents(g: torch.Tensor, cu_seqlens: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """`g` with the log-decay of every document's first token (global position `offset + t`) set to
    RESET_LOG_DECAY: the recurrence then starts each document from a zero state. The gradient reaching
    those entries of `g` is exactly 0, as it is for a first token that has no state before it."""
    check_cu_seqlens(cu_seqlens, g.shape[0])
    starts = doc_starts_mask(cu_seqlens, offset, g.shape[1], g.device)  # [B, T]
    return torch.where(starts[..., None], torch.full_like(g, RESET_LOG_DECAY), g)


def gated_linear_attn(
    q, k, v, g, scale=None, initial_state=None, output_final_state=False, chunk_size=64,
    cu_seqlens=None, offset=0,
):  # fmt: skip
    """Chunked gated linear attention: `S_t = exp(g_t) S_{t-1} + k_t^T v_t`, `o_t = scale q_t S_t`.

    Args:
        q, k: `[B, T, H, Dk]` queries and keys (fp16, bf16 or fp32; k is cast to q's dtype).
        v: `[B, T, H, Dv]` values; `Dv` may differ from `Dk`.
        g: `[B, T, H]` log-decay per token and head, `<= 0` (e.g. `logsigmoid(x w_g)`); used in fp32.
        scale: query scale, `Dk ** -0.5` when None.
        initial_state: `[B, H, Dk, Dv]` state carried in (fp32), or None for zeros. Differentiable.
        output_final_state: also return the state after the last token (differentiable: a loss on it
            sends gradients to q, k, v, g and the initial state).
        chunk_size: tokens per chunk of the Triton kernel (16, 32, 64 or 128); the result does not
            depend on it beyond rounding.
        cu_seqlens: `[B, N + 1]` int32 global document start offsets per sequence (see
            `kernels.common.docs`), or None for one document. The state resets to zero at every
            document start (the decay before that token is exp(-inf)), inside a chunk too, forward
            and backward; an `initial_state` only reaches the tokens before the first start.
        offset: global position of token 0 (a context-parallel chunk); documents start where
            `cu_seqlens` says, in global positions.
    Returns:
        `(o [B, T, H, Dv] in v's dtype, final_state [B, H, Dk, Dv] fp32 or None)`.
    """
    check_linear_args(q, k, v, initial_state, g=g)
    exact_decay = cu_seqlens is not None
    if exact_decay:
        g = reset_at_documents(g, cu_seqlens, offset)
    if op_backend("gla", q, k, v, g) == "triton" and q.dtype != torch.float64:
        from longctx.kernels.gla.chunk import chunk_gated_linear_attn

        return chunk_gated_linear_attn(
            q, k, v, g, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, chunk_size=chunk_size,
        )  # fmt: skip
    return gla_chunk_ref(
        q, k, v, g, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, chunk_size=chunk_size, exact_decay=exact_decay,
    )  # fmt: skip


def gated_linear_attn_step(q_t, k_t, v_t, g_t, state, scale=None):
    """One recurrent decoding step, the chunked op's token-by-token form.

    Args:
        q_t, k_t: `[B, H, Dk]`; v_t: `[B, H, Dv]`; g_t: `[B, H]` log-decay `<= 0`.
        state: `[B, H, Dk, Dv]` fp32 state before this token (the chunked op's final state), or None
            for zeros.
        scale: query scale, `Dk ** -0.5` when None.
    Returns:
        `(o_t [B, H, Dv] in v_t's dtype, new_state [B, H, Dk, Dv] fp32)`.
    """
    if state is None:
        state = q_t.new_zeros(*q_t.shape, v_t.shape[-1], dtype=torch.float32)
    work = torch.float64 if state.dtype == torch.float64 else torch.float32
    o_t, state = gla_step_ref(q_t, k_t, v_t, g_t, state.to(work), scale=scale)
    return o_t.to(v_t.dtype), state


__all__ = [
    "gated_linear_attn",
    "gated_linear_attn_step",
    "gla_chunk_ref",
    "gla_recurrent_ref",
    "gla_step_ref",
    "reset_at_documents",
]
