"""Gated delta rule (the G mixer): delta-rule linear attention with a scalar decay, state in and out.

`gated_delta_rule` runs the chunked Triton kernels (`chunk.py`) on CUDA or under `TRITON_INTERPRET=1`
and the chunked PyTorch form (`naive.py`) elsewhere; `gated_delta_rule_step` is the one-token
recurrence for decoding. The Triton module is imported on first use, so that `TRITON_INTERPRET` set
after `longctx.kernels` was imported still takes effect.
"""

import torch

from longctx.kernels.common import use_triton
from longctx.kernels.common.linear import check_linear_args
from longctx.kernels.gated_delta.naive import (
    gated_delta_chunk_ref,
    gated_delta_recurrent_ref,
    gated_delta_step_ref,
)
from longctx.kernels.gla import reset_at_documents


def gated_delta_rule(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, chunk_size=None,
    cu_seqlens=None, offset=0,
):  # fmt: skip
    """Chunked gated delta rule: `S_t = exp(g_t) S_{t-1}`, `u_t = beta_t (v_t - S_t^T k_t)`,
    `S_t += k_t u_t^T`, `o_t = scale S_t^T q_t`.

    Args:
        q, k: `[B, T, H, Dk]` queries and keys, used as given (the G mixer L2-normalises them; the
            recurrence is stable for `|k| <= 1`). fp16, bf16 or fp32 (fp64 runs the reference).
        v: `[B, T, H, Dv]` values; `Dv` may differ from `Dk`.
        g: `[B, T, H]` log-decay per token and head, `<= 0`; used in fp32.
        beta: `[B, T, H]` write strength in (0, 1); used in fp32.
        scale: query scale, `Dk ** -0.5` when None.
        initial_state: `[B, H, Dk, Dv]` state carried in (fp32), or None for zeros. Differentiable.
        output_final_state: also return the state after the last token (differentiable).
        chunk_size: tokens per chunk (16, 32 or 64 on the Triton path); the result does not depend on
            it beyond rounding. None: 16 on the Triton path (`chunk.DEFAULT_CHUNK`: larger chunks make
            the kernels spill registers, docs/gated-deltanet.md), 64 for the reference.
        cu_seqlens: `[B, N + 1]` int32 global document start offsets per sequence (see
            `kernels.common.docs`), or None for one document. The state resets to zero at every
            document start, inside a chunk too, forward and backward: the start token's log-decay
            becomes -1e4 (`exp` of it is exactly 0 in fp32), and since the decay multiplies the whole
            state before the token's update, `exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} = 0`. In the
            chunked form every term that crosses the start (`A`, `D`, `W`'s `exp(b)`, the carry to the
            chunk's end) holds that factor, so the chunk splits exactly. An `initial_state` only
            reaches the tokens before the first start; the gradient reaching a start's `g` is 0.
        offset: global position of token 0 (a context-parallel chunk); documents start where
            `cu_seqlens` says, in global positions.
    Returns:
        `(o [B, T, H, Dv] in v's dtype, final_state [B, H, Dk, Dv] fp32 or None)`.
    """
    check_linear_args(q, k, v, initial_state, g=g, beta=beta)
    if cu_seqlens is not None:
        g = reset_at_documents(g, cu_seqlens, offset)
    if use_triton(q, k, v, g, beta) and q.dtype != torch.float64:
        from longctx.kernels.gated_delta.chunk import chunk_gated_delta_rule

        return chunk_gated_delta_rule(
            q, k, v, g, beta, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, chunk_size=chunk_size,
        )  # fmt: skip
    return gated_delta_chunk_ref(
        q, k, v, g, beta, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, chunk_size=64 if chunk_size is None else chunk_size,
    )  # fmt: skip


def gated_delta_rule_step(q_t, k_t, v_t, g_t, beta_t, state, scale=None, reset=None):
    """One recurrent decoding step, the chunked op's token-by-token form.

    Args:
        q_t, k_t: `[B, H, Dk]`; v_t: `[B, H, Dv]`; g_t, beta_t: `[B, H]`.
        state: `[B, H, Dk, Dv]` fp32 state before this token (the chunked op's final state), or None
            for zeros (fp64 zeros for fp64 inputs).
        scale: query scale, `Dk ** -0.5` when None.
        reset: `[B]` bool, or None: the sequences whose token starts a new document; their state is
            dropped before the token (as `cu_seqlens` does in the chunked op).
    Returns:
        `(o_t [B, H, Dv] in v_t's dtype, new_state [B, H, Dk, Dv] fp32)`.
    """
    if state is None:
        dtype = torch.float64 if q_t.dtype == torch.float64 else torch.float32
        state = q_t.new_zeros(*q_t.shape, v_t.shape[-1], dtype=dtype)
    work = torch.float64 if state.dtype == torch.float64 else torch.float32
    if reset is not None:
        if reset.shape != state.shape[:1]:
            raise ValueError(f"reset must be [B] = [{state.shape[0]}] bools, got {tuple(reset.shape)}")
        state = torch.where(reset.to(state.device)[:, None, None, None], 0.0, state)
    o_t, state = gated_delta_step_ref(q_t, k_t, v_t, g_t, beta_t, state.to(work), scale=scale)
    return o_t.to(v_t.dtype), state


__all__ = [
    "gated_delta_rule",
    "gated_delta_rule_step",
    "gated_delta_chunk_ref",
    "gated_delta_recurrent_ref",
    "gated_delta_step_ref",
]
