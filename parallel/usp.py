"""Ulysses x ring (USP, `parallel.cp_comm=usp`, `parallel.ulysses_size=U`): heads inside a node,
the zigzag ring across nodes.

The `P` context-parallel ranks form `R = P / U` groups of `U` consecutive ranks (one node each).
Zigzag sharding over `P` makes group `g` hold exactly chunks `g` and `2R-1-g` of the sequence cut
into `2R` chunks: its ranks' first chunks are consecutive, and so are their second ones. So an
all-to-all over heads inside the group (`ulysses.seq_to_heads`) leaves each rank with `H / U` heads
of the zigzag shard of an `R`-rank ring, and the ring (`ring.RingAttention`) runs across the ranks
with the same position in every group. The output goes back with the inverse all-to-all.

Per layer a rank sends `(U - 1) / U` of its q, k, v and o over the fast intra-node links and
`(R - 1) / R` of its `H / U` heads' K, V around the ring (all of them cross nodes), i.e. a ring over
`P` ranks moves `U` times more bytes across nodes than USP.

S layers. With `U = P` (one group) S runs head-sharded: each rank holds `H / P` heads over the whole
sequence, so each head's strided pattern is local and only the two all-to-alls move data. The kernel
takes one head per call at the global head's pattern offset: the S2 rule depends on `j + 1 + h *
head_step`, so shifting the block ids by `h * head_step` gives a single-head call head `h`'s pattern
(window and causality depend on block differences only). With `R > 1` the S layer falls back to its
pattern-aware block exchange over all `P` ranks (`s2.ContextParallelS2Core`): exact, but not
head-sharded. Other mixers (N, L, G) keep their own schemes over all `P` ranks.

Groups: every rank must create every process group in the same order, so `usp_groups` all-gathers
every context-parallel group's ranks first (one `all_gather_object` at model setup).
"""

import torch
import torch.distributed as dist
from torch import nn

from longctx.kernels import s2_attn
from longctx.kernels.flash_attn import flash_attn
from longctx.parallel.dense import check_zigzag
from longctx.parallel.layout import SeqLayout
from longctx.parallel.ring import RingAttention
from longctx.parallel.s2 import ContextParallelS2Core
from longctx.parallel.ulysses import check_heads, heads_to_seq, seq_to_heads


class UspGroups:
    """This rank's Ulysses group (`U` consecutive context-parallel ranks) and ring group (the ranks at
    the same position of every Ulysses group), with their sizes."""

    def __init__(self, cp_group, ulysses_size: int):
        cp_ranks = (
            dist.get_process_group_ranks(cp_group)
            if cp_group is not None
            else list(range(dist.get_world_size()))
        )
        size = len(cp_ranks)
        if ulysses_size < 1 or size % ulysses_size:
            raise ValueError(
                f"parallel.ulysses_size={ulysses_size} must divide parallel.cp={size} (cp = ulysses_size x "
                "ring size)"
            )
        self.cp_group, self.ulysses_size, self.ring_size = cp_group, ulysses_size, size // ulysses_size
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, sorted(cp_ranks))
        me = dist.get_rank()
        u = ulysses_size
        # Every rank creates every group in one order (new_group is collective over the world).
        for ranks in sorted({tuple(r) for r in every}):
            for g in range(len(ranks) // u):
                group = dist.new_group(list(ranks[g * u : (g + 1) * u]))
                if me in ranks[g * u : (g + 1) * u]:
                    self.ulysses_group = group
            for j in range(u):
                group = dist.new_group(list(ranks[j::u]))
                if me in ranks[j::u]:
                    self.ring_group = group


def _to_heads(x, groups: UspGroups):
    return x if groups.ulysses_size == 1 else seq_to_heads(x, groups.ulysses_group, groups.ulysses_size)


def _to_seq(x, groups: UspGroups):
    return x if groups.ulysses_size == 1 else heads_to_seq(x, groups.ulysses_group, groups.ulysses_size)


def _heads(q, k, groups: UspGroups) -> int:
    return check_heads(q.shape[2], k.shape[2], groups.ulysses_size, "usp", "parallel.ulysses_size")


class UspDenseCore(nn.Module):
    letter = "D"

    def __init__(self, window: int | None, groups: UspGroups):
        super().__init__()
        self.window, self.groups = window, groups

    def forward(self, q, k, v, layout):
        rank, _ = check_zigzag(layout, self.groups.cp_group)
        repeat = _heads(q, k, self.groups)
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
        q_h, k_h, v_h = (_to_heads(x, self.groups) for x in (q, k, v))
        n_ring = self.groups.ring_size
        if n_ring == 1:
            cu_seqlens = None if layout.docs is None else layout.docs.on(q.device)
            o = flash_attn(q_h, k_h, v_h, causal=True, window=self.window, cu_seqlens=cu_seqlens)
        else:
            # This group's tokens are the zigzag shard of an R-rank ring (module docstring).
            ring_layout = SeqLayout.zigzag(layout.seq_len, rank // self.groups.ulysses_size, n_ring)
            ring_layout = ring_layout.with_docs(layout.docs)
            o = RingAttention.apply(q_h, k_h, v_h, ring_layout, self.window, self.groups.ring_group)
        return _to_seq(o, self.groups)


class UspS2Core(nn.Module):
    letter = "S"

    def __init__(self, cfg, groups: UspGroups):
        super().__init__()
        self.cfg, self.groups = cfg, groups
        # More than one Ulysses group: the pattern-aware block exchange over all cp ranks.
        self.exchange = ContextParallelS2Core(cfg, groups.cp_group) if groups.ring_size > 1 else None

    def forward(self, q, k, v, layout):
        if self.exchange is not None:
            return self.exchange(q, k, v, layout)
        rank, size = check_zigzag(layout, self.groups.cp_group)
        c = self.cfg
        n_heads = q.shape[2]
        repeat = _heads(q, k, self.groups)
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
        q_h, k_h, v_h = (_to_heads(x, self.groups) for x in (q, k, v))  # [B, T, H / P, D]
        local, local_kv = q_h.shape[2], k_h.shape[2]
        bs = c.block_size
        n_blocks = -(-layout.seq_len // bs)
        head_step = max(1, c.vert_stride // n_heads)
        docs = layout.docs
        outs = []
        for i in range(local):
            head = rank * local + i
            shift = head * head_step
            ids = torch.arange(n_blocks) + shift
            cu_seqlens = None
            if docs is not None:
                # Positions move by the same shift; an empty first document covers the tokens before.
                cu = docs.cu_seqlens
                cu_seqlens = torch.cat([torch.zeros_like(cu[:, :1]), cu + shift * bs], dim=1).to(q.device)
            kv = i // (local // local_kv)
            outs.append(
                s2_attn(
                    q_h[:, :, i : i + 1],
                    k_h[:, :, kv : kv + 1],
                    v_h[:, :, kv : kv + 1],
                    bs,
                    c.local_blocks,
                    c.vert_stride,
                    dense_heads=int(head >= n_heads - c.dense_heads),
                    q_block_ids=ids,
                    k_block_ids=ids,
                    cu_seqlens=cu_seqlens,
                )  # fmt: skip
            )
        return _to_seq(torch.cat(outs, dim=2), self.groups)
