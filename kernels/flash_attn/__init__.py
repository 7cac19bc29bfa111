"""Dense causal softmax attention (the D mixer, NSA's window branch, ring attention's building block)."""

from longctx.kernels.flash_attn.naive import attention_ref, merge_partials_ref


def flash_attn(q, k, v, causal=True, scale=None, window=None, return_lse=False):
    """Dense softmax attention in FlashAttention's layout.

    Args:
        q: `[B, T, H, D]` queries.
        k, v: `[B, T, H_kv, D]` keys and values, `H % H_kv == 0` (GQA).
        causal: mask keys after each query.
        scale: logit scale, `D ** -0.5` when None.
        window: sliding window; query `i` sees keys `j` with `i - window < j` (and `j <= i` if causal).
        return_lse: also return the fp32 log-sum-exp `[B, H, T]`.
    Returns:
        `o` `[B, T, H, D]` in `q.dtype`, or `(o, lse)`.
    """
    return attention_ref(q, k, v, causal=causal, scale=scale, window=window, return_lse=return_lse)


__all__ = ["flash_attn", "attention_ref", "merge_partials_ref"]
