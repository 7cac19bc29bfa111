"""Context-parallel S2 attention (S layers): the pattern's blocks, peer by peer.

S2's pattern depends only on block indices and the head, so every rank knows, before any data moves,
which key blocks each of its query blocks may attend for each head: its local window (the halo
reaches back `local_blocks - 1` blocks, possibly into another rank's chunk) and the strided blocks
`(j + 1 + h * head_step) % vert_stride == 0`; per kv head, the union over the heads of its group. Each
rank computes this for every rank once per (sequence length, rank, pattern, heads, documents) and
caches the plan (`BlockPairs`): the (block, kv head) pairs every step of the peer-by-peer schedule
moves, their sizes and the device index tensors that place them. Steady-state steps build nothing and
read nothing back from the device.

Peer by peer (`parallel.s2_exchange=peer`; `parallel.blocks.BlockPairs` under `PeerRounds`): at step
`s` rank `r` runs the S2 kernel over its queries (global block ids `held_by(r)`) against the blocks
rank `r - s` sent it, merges by lse in fp32, and meanwhile receives the next peer's blocks. The message
is the kernel's compact per-kv-head buffer as it arrives (`[B, H_kv, n, bs, 2D]`: each kv head's
blocks from that peer, padded to the longest head's count, with the `[H_kv, n]` block table), so
no kv head holds another's blocks. At most two peers' blocks are held at once: memory ~1/P of the
sequence however many blocks a kv head needs in all (small `vert_stride`, several heads per kv
group, `dense_heads`). The backward fetches again and returns each step's dK/dV in fp32 to the
owner, which adds them in step order (deterministic).

One-shot (`oneshot`; `parallel.blocks.AllRemote`): every block needed from other ranks in one batch
of messages, while the rank's own shard is computed; then one kernel call over them, merged by lse.
Fewer rounds, all remote blocks at once. `auto` (the default) picks, from the cached plan and thus
the same on every rank, the one that holds fewer fetched bytes (`exchange_slots`), and logs it once.

Communication per layer: each (block, kv head) pair some query head of the group may attend, once
(about `1 / vert_stride` of a dense ring per strided residue a kv group holds, plus the halo; dense
heads need every earlier block); the backward moves them again plus their fp32 gradients.

Documents: a key block is fetched only if it shares a document with some local query block that
may attend it, i.e. it ends after the start of that query block's first document in some sequence
of the batch (`Documents.first_visible`, decided on the host from the global boundaries every rank
holds). The kernel then masks each query to its own document.
"""

import collections
import sys

import torch
import torch.distributed as dist
from torch import nn

from longctx.kernels.s2_attn import s2_attn_chunk_bwd, s2_attn_chunk_fwd, s2_block_mask
from longctx.parallel.blocks import AllRemote, BlockPairs, PeerRounds, ZigzagBlocks
from longctx.parallel.dense import check_zigzag

_PLANS_KEPT = 16
_announced: set = set()
_plans: collections.OrderedDict = collections.OrderedDict()


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


def need_counts(need: torch.Tensor, owner: torch.Tensor, size: int) -> torch.Tensor:
    """`[P, P, H_kv]` how many blocks each rank (dim 0) needs from each owner (dim 1) per kv head."""
    n_ranks, n_kv, _ = need.shape
    counts = torch.zeros(n_ranks, size, n_kv, dtype=torch.long)
    return counts.index_add_(1, owner, need.long().transpose(1, 2))


def exchange_slots(counts: torch.Tensor) -> tuple[int, int]:
    """`(one-shot, peer by peer)`: the most (block, kv head) slots of fetched keys any rank holds at once
    (`counts [P, P, H_kv]`, `need_counts`), the same numbers on every rank.

    One-shot (`parallel.blocks.AllRemote`) computes with every block needed from other ranks at
    once, each kv head padded to the longest head's count. Peer by peer (`BlockPairs`) computes with
    one step's buffer (each kv head padded to the longest head's count from that peer) while the next
    step's arrives: twice the largest step's buffer (the bound a caching allocator keeps for the
    two; one-shot wins ties). Not counted: the rank's own shard (held either way) and one-shot's
    receive buffers while they are laid into its compact buffer (unpadded pairs, freed before the
    kernel runs).
    """
    size, _, n_kv = counts.shape
    remote = counts.clone()
    remote[torch.arange(size), torch.arange(size)] = 0  # a rank's own blocks are not fetched
    oneshot = n_kv * int(remote.sum(dim=1).max()) if counts.numel() else 0
    peer = 2 * n_kv * int(remote.amax(dim=2).max()) if counts.numel() else 0
    return oneshot, peer


def choose_exchange(mode: str, counts: torch.Tensor) -> str:
    """`"oneshot"` or `"peer"` for `parallel.s2_exchange=mode` (`auto`: one-shot where it holds no more
    than peer by peer, `exchange_slots`)."""
    if mode not in ("auto", "peer", "oneshot"):
        raise ValueError(f"parallel.s2_exchange must be auto, peer or oneshot, got {mode!r}")
    if mode != "auto":
        return mode
    oneshot, peer = exchange_slots(counts)
    return "oneshot" if oneshot <= peer else "peer"


class S2Plan:
    """One rank's cached S2 exchange: every rank's needs and, built on first use, the peer-by-peer
    (`BlockPairs`) or one-shot (`AllRemote`) schedule."""

    def __init__(self, need, rank, geo, cfg, group, device):
        self.need, self.rank, self.geo, self.group, self.device = need, rank, geo, group, device
        self.block_size = cfg.block_size
        self.counts = need_counts(need, geo.owner, need.shape[0])
        self._schedules, self._chosen = {}, {}

    def choice(self, mode: str) -> str:
        if mode not in self._chosen:
            self._chosen[mode] = choice = choose_exchange(mode, self.counts)
            oneshot, peer = exchange_slots(self.counts)
            # Once per process and choice (document boundaries make new plans every batch), on rank 0.
            if (mode, choice) not in _announced and (not dist.is_initialized() or dist.get_rank() == 0):
                _announced.add((mode, choice))
                print(
                    f"longctx: S layers exchange key blocks {choice} (parallel.s2_exchange={mode}; fetched "
                    f"keys held at once, (block, kv head) slots: one-shot {oneshot}, peer by peer {peer})",
                    file=sys.stderr, flush=True,
                )  # fmt: skip
        return self._chosen[mode]

    def schedule(self, mode: str):
        """The `PeerRounds` schedule for `parallel.s2_exchange=mode`, with the local query ids."""
        kind = self.choice(mode)
        if kind not in self._schedules:
            cls = BlockPairs if kind == "peer" else AllRemote
            sched = cls(self.need, self.rank, self.geo, self.block_size, self.group, self.device)
            sched.q_ids = self.geo.held_by(self.rank)
            self._schedules[kind] = sched
        return self._schedules[kind]


def s2_plan(cfg, n_heads: int, n_kv: int, layout, rank: int, size: int, group, device) -> S2Plan:
    """The cached exchange plan of one rank (module docstring); built on the host on first use."""
    docs = layout.docs
    key = (
        layout.seq_len, size, rank, id(group), cfg.block_size, cfg.local_blocks, cfg.vert_stride,
        cfg.dense_heads, n_heads, n_kv, str(torch.device(device)),
        None if docs is None else docs.cu_seqlens.numpy().tobytes(),
    )  # fmt: skip
    plan = _plans.get(key)
    if plan is None:
        geo = ZigzagBlocks(layout.seq_len, size, cfg.block_size)
        need = torch.stack(
            [s2_needed_blocks(cfg, n_heads, n_kv, geo.held_by(p), geo.n_blocks, docs) for p in range(size)]
        )  # every rank's needs, [P, H_kv, n_blocks]: no mask travels
        plan = S2Plan(need, rank, geo, cfg, group, device)
        _plans[key] = plan
        if len(_plans) > _PLANS_KEPT:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    return plan


class _S2Steps:
    """The S2 math of one step for `PeerRounds`: one slot, every local query. Step 0's keys are this
    rank's shard `[B, T_local, H_kv, 2D]`; later steps' a per-kv-head buffer `[B, H_kv, n, bs, 2D]`
    with its block table."""

    def __init__(self, cfg, plan, d: int, cu_seqlens):
        self.cfg, self.plan, self.d, self.cu = cfg, plan, d, cu_seqlens

    def _args(self, step):
        c = self.cfg
        return (c.block_size, c.local_blocks, c.vert_stride, c.dense_heads, self.plan.q_ids,
                self.plan.k_ids[step], self.cu)  # fmt: skip

    def forward(self, step, q, kv, extra):
        d = self.d
        return [(0, s2_attn_chunk_fwd(q, kv[..., :d], kv[..., d:], *self._args(step)))]

    def assemble(self, outs):
        return outs[0]

    def split(self, grads):
        return {0: grads[0]}

    def backward(self, step, q, kv, extra, do, o, lse):
        d = self.d
        dq, dk, dv = s2_attn_chunk_bwd(do[0], q, kv[..., :d], kv[..., d:], o[0], lse[0], *self._args(step))
        return dq, torch.cat([dk, dv], dim=-1)


class ContextParallelS2Core(nn.Module):
    """S layers under context parallelism; `exchange` is `parallel.s2_exchange` (auto, peer, oneshot)."""

    letter = "S"

    def __init__(self, cfg, group, exchange: str = "auto"):
        super().__init__()
        choose_exchange(exchange, torch.zeros(1, 1, 1, dtype=torch.long))  # validates the name
        self.cfg, self.group, self.exchange = cfg, group, exchange

    def forward(self, q, k, v, layout):
        rank, size = check_zigzag(layout, self.group)
        b, t_local, n_kv, d = k.shape
        plan = s2_plan(self.cfg, q.shape[2], n_kv, layout, rank, size, self.group, q.device)
        docs = layout.docs
        cu = None if docs is None else docs.on(q.device)
        kv = torch.cat([k, v], dim=-1)  # [B, T_local, H_kv, 2D]: one message per block and head
        schedule = plan.schedule(self.exchange)
        return PeerRounds.apply(q, kv, None, schedule, _S2Steps(self.cfg, schedule, d, cu))
