"""Counted, differentiable collectives for context parallelism.

Every byte a context-parallel op sends goes through this module, so communication is measured, not
assumed, on CPU (gloo) as on GPU (NCCL):

    reset_comm_stats()
    loss.backward()
    comm_stats()   # {"bytes_sent": ..., "all_gather": ..., "reduce_scatter": ..., ...}

What one rank counts as sent (the data volume a bandwidth-optimal algorithm moves per rank):
- all-gather of an `n`-byte shard over `P` ranks: `(P - 1) * n`;
- reduce-scatter of an `N`-byte input: `(P - 1) / P * N`;
- all-to-all of an `N`-byte input: `(P - 1) / P * N` (the part that stays is not sent);
- point-to-point: the bytes of each tensor sent.
"""

from collections import Counter

import torch
import torch.distributed as dist

_stats: Counter = Counter()

# torch 2.13 renamed the single-tensor collectives; older releases (e.g. 2.11) have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def comm_stats() -> dict:
    """Bytes this rank has sent in context-parallel communication since the last reset, by kind."""
    return {"bytes_sent": sum(_stats.values()), **dict(_stats)}


def reset_comm_stats() -> None:
    _stats.clear()


def record(kind: str, nbytes: int) -> None:
    _stats[kind] += int(nbytes)


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def all_gather_tensor(x: torch.Tensor, group) -> torch.Tensor:
    """`[P, *x.shape]`: every rank's `x`, in group-rank order (no autograd)."""
    size = dist.get_world_size(group)
    flat = x.contiguous().view(-1)
    out = flat.new_empty(size * flat.numel())
    _all_gather_single(out, flat, group=group)
    record("all_gather", (size - 1) * _nbytes(x))
    return out.view(size, *x.shape)


def reduce_scatter_tensor(x: torch.Tensor, group) -> torch.Tensor:
    """Sum `x` `[P, ...]` over ranks and keep this rank's slice `[...]` (no autograd)."""
    size = dist.get_world_size(group)
    out = x.new_empty(x[0].numel())
    _reduce_scatter_single(out, x.contiguous().view(-1), group=group)
    record("reduce_scatter", (size - 1) * _nbytes(out))
    return out.view(x.shape[1:])


def reduce_scatter_ordered(x: torch.Tensor, group) -> torch.Tensor:
    """`reduce_scatter_tensor` with a fixed summation order: an all-to-all hands every rank all `P`
    contributions to its slice, summed in rank order in fp32 (fp64 stays fp64). Bitwise reproducible
    whatever the backend's reduction algorithm; the same bytes as a reduce-scatter."""
    parts = all_to_all_tensor(x, group)  # [P, ...]: slot j is rank j's contribution to my slice
    work = torch.promote_types(x.dtype, torch.float32)
    total = parts[0].to(work, copy=True)
    for part in parts[1:]:
        total += part
    return total.to(x.dtype)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, deterministic):
        ctx.group, ctx.deterministic = group, deterministic
        return all_gather_tensor(x, group)

    @staticmethod
    def backward(ctx, grad):
        # Each rank's shard was used by every rank: its gradient is the sum of theirs, summed in fp32
        # (in a fixed order when deterministic).
        reduce = reduce_scatter_ordered if ctx.deterministic else reduce_scatter_tensor
        work = torch.promote_types(grad.dtype, torch.float32)
        return reduce(grad.to(work), ctx.group).to(grad.dtype), None, None


def all_gather(x: torch.Tensor, group, deterministic: bool = False) -> torch.Tensor:
    """Differentiable all-gather: `[P, *x.shape]`; the backward reduce-scatters the gradient (in a fixed
    order when `deterministic`)."""
    return _AllGather.apply(x, group, deterministic)


def all_to_all_tensor(x: torch.Tensor, group) -> torch.Tensor:
    """Rank `r` sends `x[j]` to rank `j` and receives rank `j`'s `x[r]` into slot `j` (no autograd)."""
    size = dist.get_world_size(group)
    if x.shape[0] != size:
        raise ValueError(
            f"all_to_all input needs a leading dim of {size} (one slice per rank), got {x.shape}"
        )
    x = x.contiguous()
    # empty_like of a permuted view would keep its strides; the collective writes densely.
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    dist.all_to_all_single(out, x, group=group)
    record("all_to_all", (size - 1) * _nbytes(x) // size)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_to_all_tensor(x, group)

    @staticmethod
    def backward(ctx, grad):
        # The transpose of an all-to-all is the same all-to-all.
        return all_to_all_tensor(grad, ctx.group), None


def all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-to-all over the leading dim (one slice per rank)."""
    return _AllToAll.apply(x, group)


def send_recv(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]], group):
    """Post point-to-point sends and receives (global peer ranks) together; returns the requests.

    Tensors must be contiguous and stay alive until the requests complete.
    """
    assert all(t.is_contiguous() for t, _ in sends + recvs), "send_recv needs contiguous tensors"
    ops = [dist.P2POp(dist.isend, t, peer, group) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, group) for t, peer in recvs]
    for t, _ in sends:
        record("p2p", _nbytes(t))
    return dist.batch_isend_irecv(ops) if ops else []
