"""S2 strided head-sharded block-sparse attention (the S mixer)."""

from longctx.kernels.s2_attn.naive import s2_attn_ref, s2_block_mask, s2_token_mask


def s2_attn(
    q, k, v, block_size=64, local_blocks=8, vert_stride=16, dense_heads=0, scale=None, return_lse=False
):
    """S2 sparse causal attention.

    Args:
        q: `[B, T, H, D]`; k, v: `[B, T, H_kv, D]` (GQA).
        block_size: tokens per block; local_blocks: blocks of the local window (diagonal included);
        vert_stride: every `vert_stride`-th block is visible, at an offset that differs by head;
        dense_heads: the last `dense_heads` heads attend densely.
        scale: logit scale, `D ** -0.5` when None; return_lse: also return lse `[B, H, T]` fp32.
    """
    return s2_attn_ref(
        q, k, v, block_size, local_blocks, vert_stride, dense_heads, scale=scale, return_lse=return_lse
    )


__all__ = ["s2_attn", "s2_attn_ref", "s2_block_mask", "s2_token_mask"]
