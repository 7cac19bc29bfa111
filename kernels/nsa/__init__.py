"""Native sparse attention (the N mixer's branches): compression, top-k selection, selected attention."""

from longctx.kernels.nsa.naive import (
    cmp_attn_ref,
    compress_ref,
    num_cmp_blocks,
    select_attn_ref,
    select_blocks_ref,
)


def nsa_compress(x, pos_emb, w1, w2, cmp_block=32, cmp_stride=16):
    """Compress `[B, T, H_kv, D]` keys or values to `[B, Tc, H_kv, D]` (see `compress_ref`)."""
    return compress_ref(x, pos_emb, w1, w2, cmp_block, cmp_stride)


def nsa_cmp_attn(q, k_cmp, v_cmp, cmp_block=32, cmp_stride=16, scale=None, return_lse=False):
    """Attention of `q` `[B, T, H, D]` over compressed tokens whose block ends at or before each query."""
    return cmp_attn_ref(q, k_cmp, v_cmp, cmp_block, cmp_stride, scale=scale, return_lse=return_lse)


def nsa_select_blocks(q, k_cmp, lse_cmp, cmp_block=32, cmp_stride=16, slc_block=64, slc_top=16, scale=None):
    """Indices `[B, T, H_kv, slc_top]` of the selected key blocks per query and kv group."""
    return select_blocks_ref(q, k_cmp, lse_cmp, cmp_block, cmp_stride, slc_block, slc_top, scale=scale)


def nsa_select_attn(q, k, v, block_idx, block_size=64, scale=None, return_lse=False):
    """Causal attention of `q` `[B, T, H, D]` over the key blocks listed in `block_idx`.

    Args:
        k, v: `[B, T, H_kv, D]`; block_idx: `[B, T, H_kv, n]` int32, `-1` unused.
    """
    return select_attn_ref(q, k, v, block_idx, block_size, scale=scale, return_lse=return_lse)


__all__ = [
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
