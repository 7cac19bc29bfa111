"""Move key/value blocks between the ranks of a zigzag-sharded sequence.

Under the zigzag layout the sequence is `n_blocks` blocks of `block_size` tokens; rank `r` holds the
blocks of chunks `r` and `2P-1-r`.

Peer by peer (what S and N layers use, below `PeerRounds`): at step `s` each rank computes against one
peer's keys (exactly the (block, kv head) pairs a static pattern needs, `BlockPairs`, or the peer's
whole shard, `WholeShards`) while the next peer's arrive; memory ~1/P, sizes fixed on the host before
the first step (no host sync), gradients returned in fp32 and added in step order (no atomics).

One exchange (`exchange_blocks`): each rank says which global blocks it needs for each kv head
(`need [H_kv, n_blocks]` bool); the masks are all-gathered (a few bits per block, read on the host:
one sync per call), every rank then knows what to send to whom, and one batch of point-to-point
messages moves only those blocks. The result is, per kv head, the needed blocks in ascending global
order, all of them at once:

    kv_needed, table = exchange_blocks(kv, need, layout, block_size, group)
    # kv_needed [B, n_max * block_size, H_kv, C]; table [H_kv, n_max] global block ids (-1: padding)

The backward sends each fetched block's gradient back to its owner, which adds it to its own in fp32.
"""

import torch
import torch.distributed as dist

from longctx.kernels.flash_attn import merge_partials
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
        # Returned gradients travel and add up in fp32 (fp64 stays fp64), in peer order: each message
        # holds distinct (block, head) pairs, so a plain gather-add-put needs no atomics.
        work = torch.promote_types(grad.dtype, torch.float32)
        grad_in = grad.new_zeros(b, t, n_kv, c, dtype=work)
        acc = _blocked(grad_in, block_size)
        src = _blocked(grad.contiguous(), block_size)
        sends, recvs, landing = [], [], []
        for p, ((s_blocks, s_heads), (r_slots, r_heads)) in enumerate(zip(plan.send, plan.recv)):
            if p == plan.rank:
                landing.append((src[r_slots, r_heads].to(work), s_blocks, s_heads))
                continue
            if len(r_slots):
                sends.append((src[r_slots, r_heads].to(work).contiguous(), plan.ranks[p]))
            if len(s_blocks):
                buf = grad.new_empty(len(s_blocks), b, block_size, c, dtype=work)
                recvs.append((buf, plan.ranks[p]))
                landing.append((buf, s_blocks, s_heads))
        for req in send_recv(sends, recvs, ctx.group):
            req.wait()
        for buf, blocks, heads in landing:
            acc.index_put_((blocks, heads), acc[blocks, heads] + buf)
        return grad_in.to(grad.dtype), None, None, None


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


# ---------------------------------------------------------------------------------------------------
# Peer by peer: memory 1/P, no host sync, fp32 deterministic gradient returns.
#
# At step `s` of `P`, rank `r` computes against the keys of rank `src = r - s` (step 0: its own), which
# `src` sent it, while it sends its own to `dst = r + s`. The next step's message is posted before a
# step computes, so at most the current and the incoming peer's keys are held. The backward fetches
# again, and sends each step's dK/dV (fp32) straight back to their owner, which adds them to its own in
# step order: no atomics, the same sums in the same order on every run. Message sizes come from a plan
# fixed on the host before the first step (every rank computes every rank's plan), so no size is read
# back from the device.


def _wait(requests) -> None:
    for req in requests:
        req.wait()


class _Peers:
    """Group ranks and the step peers of one rank."""

    def __init__(self, rank: int, size: int, group):
        self.rank, self.size, self.group = rank, size, group
        self.ranks = dist.get_process_group_ranks(group) if group is not None else list(range(size))

    def src(self, step: int) -> int:
        return (self.rank - step) % self.size

    def dst(self, step: int) -> int:
        return (self.rank + step) % self.size


class WholeShards(_Peers):
    """Every step moves a peer's whole shard (`[B, T_local, H_kv, C]`): what a data-dependent pattern
    (NSA's selection) needs when no size may be read back from the device."""

    def post(self, step: int, kv: torch.Tensor):
        buf = torch.empty_like(kv)
        reqs = send_recv([(kv, self.ranks[self.dst(step)])], [(buf, self.ranks[self.src(step)])], self.group)
        return buf, reqs

    def arrived(self, step: int, posted) -> torch.Tensor:
        _wait(posted[1])
        return posted[0]

    def post_grad(self, step: int, dkv: torch.Tensor, acc: torch.Tensor):
        buf = torch.empty_like(acc)
        sends = [(dkv.contiguous(), self.ranks[self.src(step)])]
        return buf, send_recv(sends, [(buf, self.ranks[self.dst(step)])], self.group)

    def add_grad(self, step: int, posted, acc: torch.Tensor) -> None:
        _wait(posted[1])
        acc += posted[0]


# A peer step's message is the receiver's compact buffer itself (padded, no copy) unless padding would
# add more than this fraction to the pairs that must move; then the exact pairs travel and the receiver
# lays them into the buffer (one device copy). Dense heads in one kv group, for example, pad every
# other kv head to that group's count.
PAD_LIMIT = 1.25


def lands(n_pairs: int, n_slots: int) -> bool:
    """Whether a step moving `n_pairs` (block, kv head) pairs into a buffer of `n_slots` slots sends
    the exact pairs (True) rather than the padded buffer (`PAD_LIMIT`)."""
    return n_slots > PAD_LIMIT * n_pairs


def step_tables(need: torch.Tensor, rank: int, src: int, owner: torch.Tensor) -> torch.Tensor:
    """`[H_kv, n]` the global blocks `rank` needs from `src`, ascending per kv head, `-1` padded to the
    longest head's count `n` (`need [P, H_kv, n_blocks]`, every rank's needs)."""
    mine = need[rank] & (owner == src)[None]  # [H_kv, n_blocks]
    n = int(mine.sum(dim=1).max()) if mine.numel() else 0
    table = torch.full((mine.shape[0], n), -1, dtype=torch.long)
    for g in range(mine.shape[0]):
        ids = torch.nonzero(mine[g]).flatten()
        table[g, : len(ids)] = ids
    return table


class BlockPairs(_Peers):
    """Every step moves the (block, kv head) pairs the receiver needs from the sender, fixed by a
    static pattern (`need [P, H_kv, n_blocks]` bool, every rank's needs, known on every rank).

    Step `s >= 1` computes on a compact per-kv-head buffer `[B, H_kv, n_s, bs, C]`: each kv head's
    needed blocks from this peer in ascending order, padded to the longest head's count `n_s` (table
    `k_ids[s]`, `-1` on padding slots, which are never read): no union over kv heads. The message is
    that buffer itself (padding slots carry a block of the sender's), handed to the kernel as it
    arrived; where padding would add more than `PAD_LIMIT` to the bytes, the exact pairs travel
    instead and the receiver lays them in (`lands`). Step 0 is this rank's own shard (`k_ids[0]`, its
    block ids). Gradients go back as the real pairs only, `[n_pairs, B, bs, C]` in fp32.
    """

    def __init__(self, need: torch.Tensor, rank: int, geo: ZigzagBlocks, block_size: int, group, device):
        size = need.shape[0]
        super().__init__(rank, size, group)
        self.block_size, self.n_kv = block_size, need.shape[1]
        self.k_ids, self.recv, self.send = [geo.held_by(rank)], [None], [None]
        for step in range(1, size):
            src, dst = self.src(step), self.dst(step)
            table = step_tables(need, rank, src, geo.owner)
            self.k_ids.append(table)
            heads, slots = torch.nonzero(table >= 0, as_tuple=True)  # real pairs: by head, then block
            land = lands(len(slots), table.numel())
            self.recv.append((slots.to(device), heads.to(device), table.shape[1], land))
            # What dst needs of mine, in its table's layout; padding slots repeat my block 0.
            theirs = step_tables(need, dst, rank, geo.owner)
            local = torch.where(theirs >= 0, geo.local[theirs.clamp(min=0)], 0)
            blocks, heads = _pairs(need[dst] & (geo.owner == rank)[None])
            land = lands(len(blocks), theirs.numel())
            self.send.append((local.to(device), geo.local[blocks].to(device), heads.to(device), land))

    def step_slots(self, step: int) -> int:
        """Slots `H_kv x n_s` of step `step`'s buffer (0: nothing fetched)."""
        return self.n_kv * self.k_ids[step].shape[1] if step else 0

    def post(self, step: int, kv: torch.Tensor):
        b, t, n_kv, c = kv.shape
        bs = self.block_size
        local, s_blocks, s_heads, send_pairs = self.send[step]
        r_slots, _, n_step, recv_pairs = self.recv[step]
        msg = None
        if send_pairs and len(s_blocks):
            msg = _blocked(kv, bs)[s_blocks, s_heads].contiguous()  # [n_pairs, B, bs, C]
        elif local.numel():
            heads = torch.arange(n_kv, device=kv.device)[:, None]
            # [H_kv, n, B, bs, C] (the indexed dims lead) -> [B, H_kv, n, bs, C]
            msg = kv.view(b, t // bs, bs, n_kv, c)[:, local, :, heads].permute(2, 0, 1, 3, 4).contiguous()
        shape = (len(r_slots), b, bs, c) if recv_pairs else (b, n_kv, n_step, bs, c)
        buf = kv.new_empty(shape)
        sends = [(msg, self.ranks[self.dst(step)])] if msg is not None else []
        return buf, send_recv(sends, [(buf, self.ranks[self.src(step)])] if n_step else [], self.group)

    def arrived(self, step: int, posted) -> torch.Tensor | None:
        """`[B, H_kv, n_s, bs, C]` the step's keys per kv head (table `k_ids[step]`), or None when
        nothing is needed from this peer."""
        buf, reqs = posted
        _wait(reqs)
        r_slots, r_heads, n_step, recv_pairs = self.recv[step]
        if n_step == 0:
            return None
        if not recv_pairs:
            return buf
        b, c = buf.shape[1], buf.shape[-1]
        # Padding slots stay zero (finite; never read).
        out = buf.new_zeros(b, self.n_kv, n_step, self.block_size, c)
        out[:, r_heads, r_slots] = buf.transpose(0, 1)
        return out

    def post_grad(self, step: int, dkv: torch.Tensor | None, acc: torch.Tensor):
        """Send the step's dK/dV (`[B, H_kv, n_s, bs, C]`; None: nothing was fetched) of the real pairs
        to their owner; receive those of this rank's blocks from the rank it served."""
        r_slots, r_heads, _, _ = self.recv[step]
        _, s_blocks, _, _ = self.send[step]
        b, c = acc.shape[0], acc.shape[-1]
        msg = None if dkv is None else dkv[:, r_heads, r_slots].transpose(0, 1).contiguous()
        buf = acc.new_empty(len(s_blocks), b, self.block_size, c)
        reqs = send_recv(
            [(msg, self.ranks[self.src(step)])] if len(r_slots) else [],
            [(buf, self.ranks[self.dst(step)])] if len(s_blocks) else [],
            self.group,
        )
        return buf, reqs

    def add_grad(self, step: int, posted, acc: torch.Tensor) -> None:
        buf, reqs = posted
        _wait(reqs)
        _, s_blocks, s_heads, _ = self.send[step]
        if len(s_blocks):
            blocked = _blocked(acc, self.block_size)
            # Distinct (block, head) pairs: gather, add, put back; no atomic accumulation.
            blocked.index_put_((s_blocks, s_heads), blocked[s_blocks, s_heads] + buf)


class AllRemote(_Peers):
    """The one-shot schedule for `PeerRounds`: step 0 this rank's own shard, step 1 every block it
    needs from all other ranks at once (one batch of point-to-point messages, the exact (block, kv
    head) pairs, posted before step 0 computes), laid into one compact per-kv-head buffer
    `[B, H_kv, n, bs, C]` whose table `k_ids[1]` lists each kv head's remote blocks ascending, `-1`
    padded. The backward fetches again and returns each peer's pairs' gradients in fp32, added in peer
    order. Fewer rounds than `BlockPairs`, but all remote blocks are held at once (`parallel.s2`
    decides which is smaller)."""

    def __init__(self, need: torch.Tensor, rank: int, geo: ZigzagBlocks, block_size: int, group, device):
        n_ranks = need.shape[0]
        super().__init__(rank, n_ranks, group)
        self.size = 2  # steps: own shard, then everything remote
        self.block_size, self.n_kv = block_size, need.shape[1]
        remote = need[rank] & (geo.owner != rank)[None]  # [H_kv, n_blocks]
        n = int(remote.sum(dim=1).max()) if remote.numel() else 0
        table = torch.full((self.n_kv, n), -1, dtype=torch.long)
        slot = torch.zeros(self.n_kv, geo.n_blocks, dtype=torch.long)
        for g in range(self.n_kv):
            ids = torch.nonzero(remote[g]).flatten()
            table[g, : len(ids)] = ids
            slot[g, ids] = torch.arange(len(ids))
        self.k_ids = [geo.held_by(rank), table]
        self.recv, self.send = {}, {}  # peer -> (slots, heads) / (local blocks, heads)
        for p in range(n_ranks):
            if p == rank:
                continue
            blocks, heads = _pairs(remote & (geo.owner == p)[None])
            if len(blocks):
                self.recv[p] = (slot[heads, blocks].to(device), heads.to(device))
            blocks, heads = _pairs(need[p] & (geo.owner == rank)[None])
            if len(blocks):
                self.send[p] = (geo.local[blocks].to(device), heads.to(device))

    def post(self, step: int, kv: torch.Tensor):
        b, _, _, c = kv.shape
        src = _blocked(kv, self.block_size)
        sends = [(src[blk, hd].contiguous(), self.ranks[p]) for p, (blk, hd) in self.send.items()]
        bufs = {p: kv.new_empty(len(sl), b, self.block_size, c) for p, (sl, _) in self.recv.items()}
        return kv, bufs, send_recv(sends, [(buf, self.ranks[p]) for p, buf in bufs.items()], self.group)

    def arrived(self, step: int, posted) -> torch.Tensor | None:
        kv, bufs, reqs = posted
        _wait(reqs)
        n = self.k_ids[1].shape[1]
        if n == 0:
            return None
        b, c = kv.shape[0], kv.shape[-1]
        # Unused slots stay zero (finite; the kernel never reads them).
        out = kv.new_zeros(b, self.n_kv, n, self.block_size, c)
        for p, buf in bufs.items():
            slots, heads = self.recv[p]
            out[:, heads, slots] = buf.transpose(0, 1)
        return out

    def post_grad(self, step: int, dkv: torch.Tensor | None, acc: torch.Tensor):
        b, c = acc.shape[0], acc.shape[-1]
        sends = []
        if dkv is not None:
            for p, (slots, heads) in self.recv.items():
                sends.append((dkv[:, heads, slots].transpose(0, 1).contiguous(), self.ranks[p]))
        bufs = {p: acc.new_empty(len(blk), b, self.block_size, c) for p, (blk, _) in self.send.items()}
        return bufs, send_recv(sends, [(buf, self.ranks[p]) for p, buf in bufs.items()], self.group)

    def add_grad(self, step: int, posted, acc: torch.Tensor) -> None:
        bufs, reqs = posted
        _wait(reqs)
        blocked = _blocked(acc, self.block_size)
        # In peer order; each message holds distinct (block, head) pairs: no atomics.
        for p in sorted(bufs):
            blocks, heads = self.send[p]
            blocked.index_put_((blocks, heads), blocked[blocks, heads] + bufs[p])


def _peer_keys(schedule, kv: torch.Tensor):
    """Yield `(step, keys of that step's peer)` for every step of `schedule`: step 0 this rank's own
    `kv`; each later step's message is posted before the previous step is computed, so the fetch
    overlaps the compute. The keys are None when nothing is needed from that peer."""
    size = schedule.size
    posted = schedule.post(1, kv) if size > 1 else None
    yield 0, kv
    for step in range(1, size):
        kv_s = schedule.arrived(step, posted)
        posted = schedule.post(step + 1, kv) if step + 1 < size else None
        yield step, kv_s


class PeerRounds(torch.autograd.Function):
    """Attention of the local queries over every rank's keys, peer by peer (see above).

    `compute` supplies the math: `forward(step, q, kv_step, extra) -> [(slot, (o, lse)), ...]` (partials
    over disjoint key sets, merged here by lse in fp32), `assemble({slot: o}) -> tuple of outputs`,
    `split(tuple of output grads) -> {slot: do}` and `backward(step, q, kv_step, extra, do, o, lse) ->
    (dq, dkv_step)` (given the merged `o`, `lse`: the step's exact share). `extra` is an optional
    non-differentiable tensor (NSA's block lists), saved with the rest.
    """

    @staticmethod
    def forward(ctx, q, kv, extra, schedule, compute):
        work = torch.promote_types(q.dtype, torch.float32)
        merged: dict = {}
        for step, kv_s in _peer_keys(schedule, kv):
            if kv_s is None:
                continue
            for slot, (o, lse) in compute.forward(step, q, kv_s, extra):
                if slot in merged:
                    merged[slot] = merge_partials([merged[slot][0], o.to(work)], [merged[slot][1], lse])
                else:
                    merged[slot] = (o.to(work), lse)
        slots = sorted(merged)
        ctx.slots, ctx.schedule, ctx.compute = slots, schedule, compute
        ctx.has_extra = extra is not None
        outputs = compute.assemble({s: merged[s][0].to(q.dtype) for s in slots})
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        # The outputs themselves are saved (o only enters rowsum(dO * O), in the activation dtype): the
        # next op usually saves them too, and a saved tensor is held once. lse in fp32.
        lses = [merged[s][1] for s in slots]
        ctx.save_for_backward(q, kv, *([extra] if extra is not None else []), *lses, *outputs)
        return outputs if len(outputs) > 1 else outputs[0]

    @staticmethod
    def backward(ctx, *grads):
        q, kv, *rest = ctx.saved_tensors
        extra = rest.pop(0) if ctx.has_extra else None
        n = len(ctx.slots)
        lse = dict(zip(ctx.slots, rest[:n]))
        schedule, compute = ctx.schedule, ctx.compute
        o = compute.split(tuple(rest[n:]))
        do = compute.split(grads)
        work = torch.promote_types(q.dtype, torch.float32)
        dq = torch.zeros_like(q, dtype=work)
        acc = torch.zeros_like(kv, dtype=work)
        returning = None  # the previous step's gradient exchange, finished one step later
        for step, kv_s in _peer_keys(schedule, kv):
            if kv_s is None:
                dkv = None
            else:
                dq_s, dkv = compute.backward(step, q, kv_s, extra, do, o, lse)
                dq += dq_s
                dkv = dkv.to(work)
            if step == 0:
                acc += dkv
                continue
            sent = schedule.post_grad(step, dkv, acc)
            if returning is not None:
                schedule.add_grad(*returning, acc)
            returning = (step, sent)
        if returning is not None:
            schedule.add_grad(*returning, acc)
        return dq.to(q.dtype), acc.to(kv.dtype), None, None, None
