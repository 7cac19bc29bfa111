"""Reference S2 strided head-sharded sparse attention: an explicit block mask over dense attention.

Query head `h` in query block `i` may attend key block `j` (both global block indices) iff `j <= i`
and `i - j < local_blocks` or `(j + 1 + h * head_step) % vert_stride == 0`, with
`head_step = max(1, vert_stride // H)`; token-level causality inside the diagonal block; the last
`dense_heads` heads are dense causal.

Positions are global. A whole sequence starts at `offset` (0 by default); a context-parallel shard
instead names the global block of each of its consecutive `block_size`-token blocks (`block_ids`), so
token `t` of the tensor sits at `block_ids[t // block_size] * block_size + t % block_size`.
"""

import torch

from longctx.kernels.common.docs import doc_bounds
from longctx.kernels.flash_attn.naive import attention_ref


def s2_block_mask(
    n_heads: int,
    q_blocks: torch.Tensor,
    k_blocks: torch.Tensor,
    local_blocks: int,
    vert_stride: int,
    dense_heads: int = 0,
    heads: torch.Tensor | None = None,
) -> torch.Tensor:
    """Allowed (head, query block, key block) triples, `[len(heads), len(q_blocks), len(k_blocks)]` bool.

    `q_blocks` and `k_blocks` are global block indices, so a shard can ask for its own rows.
    `heads` picks the query heads to compute (all `n_heads` when None).
    """
    head_step = max(1, vert_stride // n_heads)
    i = q_blocks.view(1, -1, 1)
    j = k_blocks.view(1, 1, -1)
    if heads is None:
        heads = torch.arange(n_heads, device=q_blocks.device)
    h = heads.to(q_blocks.device).view(-1, 1, 1)
    local = (i - j) < local_blocks
    strided = (j + 1 + h * head_step) % vert_stride == 0
    dense = h >= n_heads - dense_heads
    return (j <= i) & (local | strided | dense)


def token_positions(
    n_tokens: int, block_size: int, offset: int = 0, block_ids: torch.Tensor | None = None, device=None
) -> torch.Tensor:
    """Global position of each of `n_tokens` tokens, `[n_tokens]` int64.

    `offset + t` for a contiguous run, or `block_ids[t // block_size] * block_size + t % block_size`
    when the tensor holds the global blocks `block_ids` (one id per `block_size` tokens, the last
    block possibly partial).
    """
    t = torch.arange(n_tokens, device=device)
    if block_ids is None:
        return t + offset
    ids = torch.as_tensor(block_ids, device=device).long()
    n_blocks = -(-n_tokens // block_size)
    if ids.numel() != n_blocks:
        raise ValueError(
            f"block ids must name one global block per {block_size} tokens: {n_tokens} tokens need "
            f"{n_blocks} ids, got {ids.numel()}"
        )
    return ids[t // block_size] * block_size + t % block_size


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
    q_block_ids: torch.Tensor | None = None,
    k_block_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The S2 pattern expanded to tokens, `[H, Tq, Tk]` bool (causality is applied separately)."""
    q_block = token_positions(t_q, block_size, q_offset, q_block_ids, device) // block_size
    k_block = token_positions(t_k, block_size, k_offset, k_block_ids, device) // block_size
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
    q_block_ids: torch.Tensor | None = None,
    k_block_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
):
    """S2 attention as dense attention under the explicit S2 mask. Shapes as `attention_ref`.

    `q_offset` / `k_offset` place contiguous tensors in the sequence; `q_block_ids` / `k_block_ids`
    (int, one global block index per `block_size` tokens) place block-gathered ones and take
    precedence. Rows that see no key give `o = 0`, `lse = -inf`. `cu_seqlens` `[B, N + 1]`: keep
    each query to the keys of its own document.
    """
    mask = s2_ref_mask(
        q.shape[2], q.shape[1], k.shape[1], block_size, local_blocks, vert_stride, dense_heads, q_offset,
        k_offset, q_block_ids, k_block_ids, cu_seqlens, q.device,
    )  # fmt: skip
    return attention_ref(q, k, v, causal=False, scale=scale, return_lse=return_lse, mask=mask)


def s2_ref_mask(
    n_heads, t_q, t_k, block_size, local_blocks, vert_stride, dense_heads, q_offset=0, k_offset=0,
    q_block_ids=None, k_block_ids=None, cu_seqlens=None, device=None,
) -> torch.Tensor:  # fmt: skip
    """The full mask of `s2_attn_ref`: pattern, causality and documents, `[H, Tq, Tk]` (`[B, H, Tq, Tk]`
    with `cu_seqlens`). Arguments as `s2_attn_ref`."""
    q_pos = token_positions(t_q, block_size, q_offset, q_block_ids, device)
    k_pos = token_positions(t_k, block_size, k_offset, k_block_ids, device)
    pattern = s2_token_mask(
        n_heads, t_q, t_k, block_size, local_blocks, vert_stride, dense_heads, q_offset, k_offset, device,
        q_block_ids, k_block_ids,
    )  # fmt: skip
    mask = pattern & (k_pos[None, :] <= q_pos[:, None])
    if cu_seqlens is not None:
        same_doc = doc_bounds(cu_seqlens, q_pos)[0][:, :, None] == doc_bounds(cu_seqlens, k_pos)[0][:, None]
        mask = mask[None] & same_doc[:, None]  # [B, H, Tq, Tk]
    return mask


def table_keys(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """A compact per-kv-head buffer `[B, H_kv, n, bs, D]` as per-query-head keys `[B, n * bs, H, D]`
    (each query head gets its kv head's blocks; gradients sum back over the GQA group)."""
    group = n_heads // x.shape[1]
    return x.repeat_interleave(group, dim=1).flatten(2, 3).transpose(1, 2)


def s2_table_mask(
    n_heads, t_q, k_table, block_size, local_blocks, vert_stride, dense_heads, q_block_ids=None,
    cu_seqlens=None, device=None,
) -> torch.Tensor:  # fmt: skip
    """The mask of `s2_attn_table_ref` over `table_keys` columns: `[H, Tq, n * bs]` (`[B, H, Tq, n * bs]`
    with `cu_seqlens`). Query head `h` sees slot `s` of kv head `h // (H // H_kv)` at global block
    `k_table[g, s]` (never an unused `-1` slot), under S2's pattern, causality and documents."""
    k_table = torch.as_tensor(k_table, device=device).long()
    n_kv, n = k_table.shape
    group = n_heads // n_kv
    q_pos = token_positions(t_q, block_size, 0, q_block_ids, device)  # [Tq]
    r = torch.arange(block_size, device=device)
    table = k_table.repeat_interleave(group, dim=0)  # [H, n]
    k_pos = (table[:, :, None] * block_size + r).flatten(1)  # [H, n * bs]
    used = (table >= 0).repeat_interleave(block_size, dim=1)  # [H, n * bs]
    # DESIGN.md's rule with each head's own key blocks: i, j global blocks, [H, Tq, n * bs].
    i, j = (q_pos // block_size)[None, :, None], k_pos[:, None, :] // block_size
    h = torch.arange(n_heads, device=device)[:, None, None]
    strided = (j + 1 + h * max(1, vert_stride // n_heads)) % vert_stride == 0
    blocks = (j <= i) & ((i - j < local_blocks) | strided | (h >= n_heads - dense_heads))
    mask = blocks & used[:, None, :] & (k_pos[:, None, :] <= q_pos[None, :, None])
    if cu_seqlens is not None:
        q_doc = doc_bounds(cu_seqlens, q_pos)[0]  # [B, Tq]
        k_doc = doc_bounds(cu_seqlens, k_pos.clamp(min=0).flatten())[0].view(-1, n_heads, k_pos.shape[1])
        mask = mask[None] & (q_doc[:, None, :, None] == k_doc[:, :, None, :])
    return mask


def s2_attn_table_ref(
    q, k, v, k_table, block_size=64, local_blocks=8, vert_stride=16, dense_heads=0, scale=None,
    return_lse=False, q_block_ids=None, cu_seqlens=None,
):  # fmt: skip
    """S2 attention over per-kv-head key blocks, as dense attention under an explicit mask.

    `k`, `v` `[B, H_kv, n, block_size, D]`: kv head `g`'s slot `s` holds global block `k_table[g, s]`
    (`k_table` `[H_kv, n]`, `-1` unused). Other arguments and returns as `s2_attn_ref`.
    """
    mask = s2_table_mask(
        q.shape[2], q.shape[1], k_table, block_size, local_blocks, vert_stride, dense_heads, q_block_ids,
        cu_seqlens, q.device,
    )  # fmt: skip
    k_all, v_all = table_keys(k, q.shape[2]), table_keys(v, q.shape[2])
    return attention_ref(q, k_all, v_all, causal=False, scale=scale, return_lse=return_lse, mask=mask)
