"""Fetch exactly the key/value blocks each rank needs, per kv head, from the ranks that hold them.

Under the zigzag layout the sequence is `n_blocks` blocks of `block_size` tokens; rank `r` holds the
blocks of chunks `r` and `2P-1-r`. Each rank says which global blocks it needs for each kv head
(`need [H_kv, n_blocks]` bool: the strided blocks and halo of an S2 head, the blocks an NSA kv group
selected, a window's halo); the masks are all-gathered (a few bits per block), every rank then knows
what to send to whom, and one batch of point-to-point messages moves only those blocks. The result
is, per kv head, the needed blocks in ascending global order:

    kv_needed, table = exchange_blocks(kv, need, layout, block_size, group)
    # kv_needed [B, n_max * block_size, H_kv, C]; table [H_kv, n_max] global block ids (-1: padding)

The backward sends each fetched block's gradient back to its owner, which adds it to its own.
"""

import torch
import torch.distributed as dist

from longctx.parallel.comm import all_gather_tensor, send_recv
from longctx.parallel.dense import check_zigzag


class ZigzagBlocks:
    """Where every global block of a zigzag-sharded sequence lives."""

    def __init__(self, seq_len: int, size: int, block_size: int):
        chunk = seq_len // (2 * size)
        if chunk % block_size:
            raise ValueError(
                f"zigzag chunks of {chunk} tokens do not hold whole {block_size}-token blocks; use a "
                f"sequence length that is a multiple of {2 * size * block_size}"
            )
        self.per_chunk = chunk // block_size
        self.n_blocks = seq_len // block_size
        chunk_of = torch.arange(self.n_blocks) // self.per_chunk
        second = chunk_of >= size
        self.owner = torch.where(second, 2 * size - 1 - chunk_of, chunk_of)  # [n_blocks]
        self.local = torch.arange(self.n_blocks) % self.per_chunk + second.long() * self.per_chunk

    def held_by(self, rank: int) -> torch.Tensor:
        """Global ids of the blocks `rank` holds, in its local order."""
        ids = torch.nonzero(self.owner == rank).flatten()
        return ids[torch.argsort(self.local[ids])]


def _pairs(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(block id, kv head) of every True entry of a `[H_kv, n_blocks]` mask, ordered by head then block."""
    heads, blocks = torch.nonzero(mask, as_tuple=True)
    return blocks, heads


class _Plan:
    def __init__(self, need_all: torch.Tensor, rank: int, geo: ZigzagBlocks, ranks: list[int], device):
        size, n_kv, _ = need_all.shape
        self.rank, self.ranks, self.geo = rank, ranks, geo
        mine = need_all[rank]
        counts = mine.sum(dim=1)
        self.n_max = int(counts.max()) if counts.numel() else 0
        self.table = torch.full((n_kv, self.n_max), -1, dtype=torch.long)
        slot = torch.zeros(n_kv, geo.n_blocks, dtype=torch.long)
        for g in range(n_kv):
            ids = torch.nonzero(mine[g]).flatten()
            self.table[g, : len(ids)] = ids
            slot[g, ids] = torch.arange(len(ids))
        # From each peer p: the blocks it owns that I need -> where they go in my gathered tensor.
        self.recv = []
        # To each peer p: the blocks I own that p needs -> where they are in my local tensor.
        self.send = []
        for p in range(size):
            blocks, heads = _pairs(mine & (geo.owner == p)[None])
            self.recv.append((slot[heads, blocks].to(device), heads.to(device)))
            blocks, heads = _pairs(need_all[p] & (geo.owner == rank)[None])
            self.send.append((geo.local[blocks].to(device), heads.to(device)))


def _blocked(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """`[B, n * bs, H, C]` -> `[n, H, B, bs, C]` view for (block, head) indexing."""
    b, t, h, c = x.shape
    return x.view(b, t // block_size, block_size, h, c).permute(1, 3, 0, 2, 4)


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kv, plan, block_size, group):
        b, _, n_kv, c = kv.shape
        src = _blocked(kv, block_size)
        out = kv.new_zeros(b, plan.n_max * block_size, n_kv, c)
        dst = _blocked(out, block_size)
        sends, recvs, landing = [], [], []
        for p, ((s_blocks, s_heads), (r_slots, r_heads)) in enumerate(zip(plan.send, plan.recv)):
            if p == plan.rank:
                dst[r_slots, r_heads] = src[s_blocks, s_heads]
                continue
            if len(s_blocks):
                sends.append((src[s_blocks, s_heads].contiguous(), plan.ranks[p]))
            if len(r_slots):
                buf = kv.new_empty(len(r_slots), b, block_size, c)
                recvs.append((buf, plan.ranks[p]))
                landing.append((buf, r_slots, r_heads))
        for req in send_recv(sends, recvs, group):
            req.wait()
        for buf, slots, heads in landing:
            dst[slots, heads] = buf
        ctx.plan, ctx.block_size, ctx.group, ctx.shape = plan, block_size, group, kv.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        plan, block_size = ctx.plan, ctx.block_size
        b, t, n_kv, c = ctx.shape
        grad_in = grad.new_zeros(b, t, n_kv, c)
        acc = _blocked(grad_in, block_size)
        src = _blocked(grad.contiguous(), block_size)
        sends, recvs, landing = [], [], []
        for p, ((s_blocks, s_heads), (r_slots, r_heads)) in enumerate(zip(plan.send, plan.recv)):
            if p == plan.rank:
                acc.index_put_((s_blocks, s_heads), src[r_slots, r_heads], accumulate=True)
                continue
            if len(r_slots):
                sends.append((src[r_slots, r_heads].contiguous(), plan.ranks[p]))
            if len(s_blocks):
                buf = grad.new_empty(len(s_blocks), b, block_size, c)
                recvs.append((buf, plan.ranks[p]))
                landing.append((buf, s_blocks, s_heads))
        for req in send_recv(sends, recvs, ctx.group):
            req.wait()
        for buf, blocks, heads in landing:
            acc.index_put_((blocks, heads), buf, accumulate=True)
        return grad_in, None, None, None


def exchange_blocks(kv: torch.Tensor, need: torch.Tensor, layout, block_size: int, group):
    """Gather the blocks this rank needs, per kv head (differentiable; see the module docstring).

    Args:
        kv: `[B, T_local, H_kv, C]` this rank's zigzag shard (k and v may share C).
        need: `[H_kv, n_blocks]` bool, the global blocks this rank needs for each kv head.
        layout: this rank's zigzag `SeqLayout`; block_size: tokens per block.
    Returns:
        `(kv_needed [B, n_max * block_size, H_kv, C], table [H_kv, n_max] int64)`, the table giving the
        global block id of each gathered block per kv head (`-1` where a head needs fewer blocks).
    """
    rank, size = check_zigzag(layout, group)
    geo = ZigzagBlocks(layout.seq_len, size, block_size)
    need_all = all_gather_tensor(need.to(torch.uint8), group).bool().cpu()  # [P, H_kv, n_blocks]
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(size))
    plan = _Plan(need_all, rank, geo, ranks, kv.device)
    return _Exchange.apply(kv, plan, block_size, group), plan.table.to(kv.device)
