"""Ulysses all-to-all attention for D layers (`parallel.cp_comm=ulysses`).

An all-to-all turns each rank's zigzag token shard of every head into the whole sequence of `H / P`
heads; the rank runs ordinary causal flash attention on them; a second all-to-all turns the output
back into token shards of every head. Per layer it moves `(P - 1) / P` of q, k, v and o forward (the
backward mirrors it), independent of how the causal work falls, but it needs `P` to divide the
query heads. Key/value heads fewer than `P` are replicated (`P` must then be a multiple of them) so
each rank has the kv head its query heads read.

DeepSpeed's `DistributedAttention` does the same exchange, but its collectives would bypass
`longctx.parallel.comm`'s byte accounting and it knows nothing of the zigzag order, so the two
all-to-alls are written here with the counted, differentiable `all_to_all`.
"""

import torch
from torch import nn

from longctx.kernels.flash_attn import flash_attn
from longctx.parallel.comm import all_to_all
from longctx.parallel.dense import check_zigzag
from longctx.parallel.layout import zigzag_shard, zigzag_unshard


def check_heads(
    n_heads: int, n_kv_heads: int, size: int, scheme: str = "ulysses", axis: str = "parallel.cp"
) -> int:
    """How many times each kv head is repeated so the heads split evenly over `size` ranks."""
    if n_heads % size:
        raise ValueError(
            f"parallel.cp_comm={scheme} splits heads over ranks: {n_heads} query heads do not divide over "
            f"{axis}={size}; use a {axis} that divides {n_heads}, or parallel.cp_comm=ring"
        )
    if n_kv_heads % size == 0:
        return 1
    if size % n_kv_heads == 0:
        return size // n_kv_heads
    raise ValueError(
        f"parallel.cp_comm={scheme}: {n_kv_heads} kv heads and {axis}={size} must divide one another "
        "(kv heads are split, or replicated when fewer than the ranks); use parallel.cp_comm=ring"
    )


def seq_to_heads(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """`[B, T/P, H, D]` zigzag token shard -> `[B, T, H/P, D]` whole sequence of this rank's heads."""
    b, t_local, h, d = x.shape
    parts = x.reshape(b, t_local, size, h // size, d).permute(2, 0, 1, 3, 4)  # [P, B, T/P, H/P, D]
    received = all_to_all(parts, group)  # slot j: rank j's tokens of my heads
    return zigzag_unshard(list(received.unbind(0)), dim=1)


def heads_to_seq(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """Inverse of `seq_to_heads`: `[B, T, H/P, D]` -> `[B, T/P, H, D]`."""
    parts = torch.stack([zigzag_shard(x, r, size) for r in range(size)])  # [P, B, T/P, H/P, D]
    received = all_to_all(parts, group)  # slot j: my tokens of rank j's heads
    b, t_local = received.shape[1:3]
    return received.permute(1, 2, 0, 3, 4).reshape(b, t_local, -1, x.shape[-1])


class UlyssesDenseCore(nn.Module):
    letter = "D"

    def __init__(self, window: int | None, group):
        super().__init__()
        self.window, self.group = window, group

    def forward(self, q, k, v, layout):
        _, size = check_zigzag(layout, self.group)
        repeat = check_heads(q.shape[2], k.shape[2], size)
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
        q_h, k_h, v_h = (seq_to_heads(x, self.group, size) for x in (q, k, v))
        # Whole sequences of a few heads: documents are masked as on one device.
        cu_seqlens = None if layout.docs is None else layout.docs.on(q.device)
        o = flash_attn(q_h, k_h, v_h, causal=True, window=self.window, cu_seqlens=cu_seqlens)
        return heads_to_seq(o, self.group, size)
