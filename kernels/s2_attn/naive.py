"""Reference S2 strided head-sharded sparse attention: an explicit block mask over dense attention.

Query head `h` in query block `i` may attend key block `j` (both global block indices) iff `j <= i`
and `i - j < local_blocks` or `(j + 1 + h * head_step) % vert_stride == 0`, with
`head_step = max(1, vert_stride // H)`; token-level causality inside the diagonal block; the last
`dense_heads` heads are dense causal.
"""

import torch

from longctx.kernels.flash_attn.naive import attention_ref


def s2_block_mask(
    n_heads: int,
    q_blocks: torch.Tensor,
    k_blocks: torch.Tensor,
    local_blocks: int,
    vert_stride: int,
    dense_heads: int = 0,
) -> torch.Tensor:
    """Allowed (head, query block, key block) triples, `[H, len(q_blocks), len(k_blocks)]` bool.

    `q_blocks` and `k_blocks` are global block indices, so a shard can ask for its own rows.
    """
    head_step = max(1, vert_stride // n_heads)
    i = q_blocks.view(1, -1, 1)
    j = k_blocks.view(1, 1, -1)
    h = torch.arange(n_heads, device=q_blocks.device).view(-1, 1, 1)
    local = (i - j) < local_blocks
    strided = (j + 1 + h * head_step) % vert_stride == 0
    dense = h >= n_heads - dense_heads
    return (j <= i) & (local | strided | dense)


def s2_token_mask(
    n_heads: int,
    t_q: int,
    t_k: int,
    block_size: int,
    local_blocks: int,
    vert_stride: int,
    dense_heads: int = 0,
    q_offset: int = 0,
    k_offset: int = 0,
    device=None,
) -> torch.Tensor:
    """The S2 pattern expanded to tokens, `[H, Tq, Tk]` bool (causality is applied separately)."""
    q_block = (torch.arange(t_q, device=device) + q_offset) // block_size
    k_block = (torch.arange(t_k, device=device) + k_offset) // block_size
    q_ids, q_inv = torch.unique(q_block, return_inverse=True)
    k_ids, k_inv = torch.unique(k_block, return_inverse=True)
    blocks = s2_block_mask(n_heads, q_ids, k_ids, local_blocks, vert_stride, dense_heads)
    return blocks[:, q_inv][:, :, k_inv]


def s2_attn_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int = 64,
    local_blocks: int = 8,
    vert_stride: int = 16,
    dense_heads: int = 0,
    scale: float | None = None,
    return_lse: bool = False,
    q_offset: int = 0,
    k_offset: int = 0,
):
    """S2 attention as dense attention under the explicit S2 mask. Shapes as `attention_ref`."""
    mask = s2_token_mask(
        q.shape[2],
        q.shape[1],
        k.shape[1],
        block_size,
        local_blocks,
        vert_stride,
        dense_heads,
        q_offset,
        k_offset,
        q.device,
    )
    return attention_ref(
        q,
        k,
        v,
        causal=True,
        scale=scale,
        return_lse=return_lse,
        q_offset=q_offset,
        k_offset=k_offset,
        mask=mask,
    )
