"""Reference native sparse attention (NSA) branches in plain PyTorch.

- `compress_ref`: blocks of `cmp_block` keys (or values) every `cmp_stride` tokens, plus a learned
  intra-block position embedding, mapped to one token by mean pooling plus a learned MLP.
- `cmp_attn_ref`: queries attend the compressed tokens whose block ends at or before them.
- `select_blocks_ref`: block importance from the compression branch's probabilities, summed over
  the compression blocks overlapping each selection block and over the query heads of a kv group;
  the `slc_top` most important blocks at or before each query, always block 0 and the two local ones.
- `select_attn_ref`: attention over the tokens of the listed blocks, causal.
The window branch is `flash_attn(window=...)`.

Documents: `doc_start` `[B, T]` (each query's document start, global) keeps every branch inside the
query's document. Compression blocks stay at global multiples of `cmp_stride`; a compressed token
whose block starts before the query's document is masked (a block crossing a boundary is therefore
seen by neither document); selection ranks only blocks from the document's first block on, forcing
that block (in place of block 0) and the local ones; selected attention masks keys before the start.
"""

import torch
import torch.nn.functional as F

from longctx.kernels.flash_attn.naive import attention_ref


def num_cmp_blocks(t: int, cmp_block: int, cmp_stride: int) -> int:
    """Full compression blocks in `t` tokens: block `i` covers `[i*stride, i*stride + cmp_block)`."""
    return 0 if t < cmp_block else (t - cmp_block) // cmp_stride + 1


def compress_ref(
    x: torch.Tensor,
    pos_emb: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    cmp_block: int,
    cmp_stride: int,
) -> torch.Tensor:
    """Compress keys or values block by block.

    Args:
        x: `[B, T, H_kv, D]`.
        pos_emb: `[cmp_block, D]` intra-block position embedding.
        w1: `[hidden, cmp_block * D]`, w2: `[D, hidden]`: the MLP
            `mean(block) + w2 @ silu(w1 @ flatten(block))`, with `block = x[window] + pos_emb`.
    Returns:
        `[B, Tc, H_kv, D]`, compressed token `i` standing for block `i`.
    """
    b, t, h, d = x.shape
    n = num_cmp_blocks(t, cmp_block, cmp_stride)
    if n == 0:
        return x.new_zeros(b, 0, h, d)
    blocks = x[:, : (n - 1) * cmp_stride + cmp_block].unfold(1, cmp_block, cmp_stride)  # [B, n, H, D, L]
    blocks = blocks.permute(0, 1, 2, 4, 3) + pos_emb  # [B, n, H, L, D]
    hidden = F.silu(blocks.flatten(-2) @ w1.t())
    return blocks.mean(dim=-2) + hidden @ w2.t()


def cmp_token_mask(t_q: int, n_cmp: int, cmp_block: int, cmp_stride: int, q_offset: int, device):
    """`[Tq, Tc]`: query at global position `p` sees compressed token `i` iff its block ends `<= p`."""
    q_pos = torch.arange(t_q, device=device)[:, None] + q_offset
    block_end = torch.arange(n_cmp, device=device)[None, :] * cmp_stride + cmp_block - 1
    return block_end <= q_pos


def cmp_doc_mask(doc_start: torch.Tensor, n_cmp: int, cmp_stride: int) -> torch.Tensor:
    """`[B, 1, T, Tc]`: compressed token `i` lies inside the query's document (starts at or after it)."""
    starts = torch.arange(n_cmp, device=doc_start.device) * cmp_stride
    return (starts[None, None, :] >= doc_start[:, :, None])[:, None]


def cmp_attn_ref(
    q, k_cmp, v_cmp, cmp_block, cmp_stride, scale=None, return_lse=False, q_offset=0, doc_start=None
):
    """Attention over compressed tokens. q `[B, T, H, D]`, k_cmp/v_cmp `[B, Tc, H_kv, D]`."""
    mask = cmp_token_mask(q.shape[1], k_cmp.shape[1], cmp_block, cmp_stride, q_offset, q.device)
    if doc_start is not None:
        mask = mask & cmp_doc_mask(doc_start, k_cmp.shape[1], cmp_stride)
    return attention_ref(q, k_cmp, v_cmp, causal=False, scale=scale, return_lse=return_lse, mask=mask)


def block_overlap(n_cmp: int, n_slc: int, cmp_block: int, cmp_stride: int, slc_block: int, device):
    """`[Tc, n_slc]` 1.0 where compression block `i` overlaps selection block `j`."""
    start = torch.arange(n_cmp, device=device)[:, None] * cmp_stride
    j = torch.arange(n_slc, device=device)[None, :]
    return ((start < (j + 1) * slc_block) & (start + cmp_block > j * slc_block)).float()


@torch.no_grad()
def select_blocks_ref(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    lse_cmp: torch.Tensor,
    cmp_block: int,
    cmp_stride: int,
    slc_block: int,
    slc_top: int,
    scale: float | None = None,
    q_offset: int = 0,
    doc_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-k selection blocks per query and kv group.

    Args:
        q: `[B, T, H, D]`; k_cmp: `[B, Tc, H_kv, D]`; lse_cmp: `[B, H, T]` of the compression branch.
    Returns:
        `[B, T, H_kv, slc_top]` int32 global block indices, ascending, `-1` for unused slots. Ties in
        importance go to the lower block index.
    """
    b, t, n_heads, d = q.shape
    n_kv = k_cmp.shape[2]
    scale = d**-0.5 if scale is None else scale
    n_slc = (q_offset + t + slc_block - 1) // slc_block
    q_block = (torch.arange(t, device=q.device) + q_offset) // slc_block  # [T]
    if k_cmp.shape[1] > 0:
        qf = q.float().transpose(1, 2)
        kf = k_cmp.float().repeat_interleave(n_heads // n_kv, dim=2).transpose(1, 2)
        scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, H, T, Tc]
        mask = cmp_token_mask(t, k_cmp.shape[1], cmp_block, cmp_stride, q_offset, q.device)
        if doc_start is not None:
            mask = mask & cmp_doc_mask(doc_start, k_cmp.shape[1], cmp_stride)
        lse = lse_cmp.float()
        safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        probs = torch.exp(scores - safe[..., None]).masked_fill(~mask, 0.0)
        overlap = block_overlap(k_cmp.shape[1], n_slc, cmp_block, cmp_stride, slc_block, q.device)
        importance = torch.matmul(probs, overlap)  # [B, H, T, n_slc]
        importance = importance.view(b, n_kv, n_heads // n_kv, t, n_slc).sum(2)
    else:
        importance = q.new_zeros(b, n_kv, t, n_slc, dtype=torch.float32)
    j = torch.arange(n_slc, device=q.device)[None, :]
    # The first block of the query's document ([B, 1, T, 1]; block 0 without documents).
    first = torch.zeros(1, dtype=torch.long, device=q.device)
    if doc_start is not None:
        first = (doc_start.long() // slc_block)[:, None, :, None]
    forced = (j == first) | (j == q_block[:, None]) | (j == q_block[:, None] - 1)
    importance = importance.masked_fill(forced, float("inf"))
    importance = importance.masked_fill((j > q_block[:, None]) | (j < first), float("-inf"))
    n_pick = min(slc_top, n_slc)
    values, order = torch.sort(importance, dim=-1, descending=True, stable=True)
    idx = torch.where(values[..., :n_pick] == float("-inf"), -1, order[..., :n_pick])
    # Ascending block order with unused slots (-1) last.
    idx = torch.where(idx < 0, n_slc, idx).sort(dim=-1).values
    idx = torch.where(idx == n_slc, -1, idx)
    if n_pick < slc_top:
        idx = F.pad(idx, (0, slc_top - n_pick), value=-1)
    return idx.permute(0, 2, 1, 3).to(torch.int32).contiguous()


def block_membership(block_idx: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """`[B, T, H_kv, n_blocks]` bool from an index list `[B, T, H_kv, n]` (-1 = unused)."""
    if block_idx.numel() and int(block_idx.max()) >= n_blocks:
        raise ValueError(
            f"block_idx lists block {int(block_idx.max())} but the keys hold only {n_blocks} blocks"
        )
    slots = torch.where(block_idx < 0, n_blocks, block_idx.long())
    member = torch.zeros(*block_idx.shape[:-1], n_blocks + 1, dtype=torch.bool, device=block_idx.device)
    member.scatter_(-1, slots, True)
    return member[..., :n_blocks]


def select_attn_ref(
    q, k, v, block_idx, block_size=64, scale=None, return_lse=False, q_offset=0, k_offset=0, doc_start=None
):
    """Causal attention restricted to the listed key blocks.

    Args:
        q: `[B, T, H, D]`; k, v: `[B, Tk, H_kv, D]`;
        block_idx: `[B, T, H_kv, n]` int global key-block indices, `-1` unused. A listed block after
            the query is still masked by causality.
    """
    n_heads, n_kv = q.shape[2], k.shape[2]
    t_k = k.shape[1]
    n_blocks = (k_offset + t_k + block_size - 1) // block_size
    member = block_membership(block_idx, n_blocks)  # [B, T, H_kv, n_blocks]
    key_block = (torch.arange(t_k, device=q.device) + k_offset) // block_size
    mask = member[..., key_block]  # [B, T, H_kv, Tk]
    mask = mask.repeat_interleave(n_heads // n_kv, dim=2).permute(0, 2, 1, 3)  # [B, H, T, Tk]
    if doc_start is not None:
        k_pos = torch.arange(t_k, device=q.device) + k_offset
        mask = mask & (k_pos[None, None, None, :] >= doc_start[:, None, :, None])
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
