"""Context-parallel S2 attention (S layers): a pattern-aware exchange.

S2's pattern depends only on block indices and the head, so every rank knows, before any data moves,
which key blocks each of its query blocks may attend for each head: its local window (the halo
reaches back `local_blocks - 1` blocks, possibly into another rank's chunk) and the strided blocks
`(j + 1 + h * head_step) % vert_stride == 0`. Per kv head it needs the union over the heads of its
group; a block exchange (`parallel.blocks`) fetches exactly those blocks from their owners, and the
S2 kernel runs on the local query blocks against them at their global block ids. The backward
returns each fetched block's dK, dV to its owner.

The kernel takes one set of key block ids for every head, so the fetched blocks are laid into the
union of all kv heads' blocks, each head's unneeded blocks left zero. The kernel never reads those:
head `h` visits only blocks its pattern allows, and those are exactly the ones fetched for its kv
head. Communication is therefore about `1 / vert_stride` of a dense ring per strided residue a kv
group holds, plus the halo; `dense_heads` need every earlier block.

Documents: a key block is fetched only if it shares a document with some local query block that
may attend it, i.e. it ends after the start of that query block's first document in some sequence
of the batch (`Documents.first_visible`, decided on the host from the global boundaries every rank
holds). The kernel then masks each query to its own document.
"""

import torch
from torch import nn

from longctx.kernels import s2_attn
from longctx.kernels.s2_attn import s2_block_mask
from longctx.parallel.blocks import ZigzagBlocks, exchange_blocks
from longctx.parallel.dense import check_zigzag


def s2_needed_blocks(
    cfg, n_heads: int, n_kv: int, q_ids: torch.Tensor, n_blocks: int, docs=None
) -> torch.Tensor:
    """`[H_kv, n_blocks]` bool: the key blocks any query head of each kv group may attend from `q_ids`
    (with `docs`, only blocks sharing a document with the query block)."""
    allowed = s2_block_mask(
        n_heads, q_ids, torch.arange(n_blocks), cfg.local_blocks, cfg.vert_stride, cfg.dense_heads
    )  # [H, n_q, n_blocks]
    if docs is not None:
        bs = cfg.block_size
        first = torch.tensor([docs.first_visible(int(i) * bs, bs) for i in q_ids])  # [n_q]
        block_end = (torch.arange(n_blocks) + 1) * bs
        allowed = allowed & (block_end[None, :] > first[:, None])[None]
    per_head = allowed.any(dim=1)
    return per_head.view(n_kv, n_heads // n_kv, n_blocks).any(dim=1)


class ContextParallelS2Core(nn.Module):
    letter = "S"

    def __init__(self, cfg, group):
        super().__init__()
        self.cfg, self.group = cfg, group

    def forward(self, q, k, v, layout):
        rank, size = check_zigzag(layout, self.group)
        c = self.cfg
        bs = c.block_size
        b, t_local, n_kv, d = k.shape
        geo = ZigzagBlocks(layout.seq_len, size, bs)
        q_ids = geo.held_by(rank)  # ascending: chunk r's blocks, then chunk 2P-1-r's
        docs = layout.docs
        need = s2_needed_blocks(c, q.shape[2], n_kv, q_ids, geo.n_blocks, docs).to(q.device)
        packed = torch.stack([k, v], dim=3).reshape(b, t_local, n_kv, 2 * d)
        fetched, table = exchange_blocks(packed, need, layout, bs, self.group)

        union = torch.unique(table[table >= 0])  # sorted global ids
        counts = (table >= 0).sum(dim=1)
        slots = torch.arange(table.shape[1], device=table.device)
        valid = slots[None, :] < counts[:, None]  # [H_kv, n_max]
        heads = torch.arange(n_kv, device=table.device)[:, None].expand_as(table)[valid]
        src = slots[None, :].expand_as(table)[valid]
        dst = torch.searchsorted(union, table[valid])
        blocks = fetched.view(b, -1, bs, n_kv, 2 * d).permute(1, 3, 0, 2, 4)  # [n_max, H_kv, B, bs, 2D]
        laid = blocks.new_zeros(len(union), n_kv, b, bs, 2 * d).index_put((dst, heads), blocks[src, heads])
        keys = laid.permute(2, 0, 3, 1, 4).reshape(b, len(union) * bs, n_kv, 2 * d)
        return s2_attn(
            q, keys[..., :d], keys[..., d:], bs, c.local_blocks, c.vert_stride, c.dense_heads,
            q_block_ids=q_ids, k_block_ids=union.cpu(),
            cu_seqlens=None if docs is None else docs.on(q.device),
        )  # fmt: skip
