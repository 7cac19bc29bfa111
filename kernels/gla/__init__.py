"""Gated linear attention with state in and out (the L mixer)."""

from longctx.kernels.gla.naive import gla_chunk_ref, gla_recurrent_ref, gla_step_ref


def gated_linear_attn(q, k, v, g, scale=None, initial_state=None, output_final_state=False):
    """Chunked gated linear attention.

    Args:
        q, k: `[B, T, H, Dk]`; v: `[B, T, H, Dv]`; g: `[B, T, H]` log-decay, `<= 0`.
        scale: `Dk ** -0.5` when None.
        initial_state: `[B, H, Dk, Dv]` fp32 state carried in, or None for zeros.
        output_final_state: also return the state after the last token.
    Returns:
        `(o [B, T, H, Dv], final_state [B, H, Dk, Dv] fp32 or None)`.
    """
    return gla_chunk_ref(
        q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state
    )


def gated_linear_attn_step(q_t, k_t, v_t, g_t, state, scale=None):
    """One recurrent decoding step; shapes `[B, H, D]`, `g_t` `[B, H]`, state `[B, H, Dk, Dv]` fp32."""
    return gla_step_ref(q_t, k_t, v_t, g_t, state, scale=scale)


__all__ = [
    "gated_linear_attn",
    "gated_linear_attn_step",
    "gla_chunk_ref",
    "gla_recurrent_ref",
    "gla_step_ref",
]
