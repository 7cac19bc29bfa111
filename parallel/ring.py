"""Zigzag ring attention for D layers (`parallel.cp_comm=ring`, the default).

Rank `r` of `P` holds query and key/value chunks `r` and `2P-1-r` of the `2P`-chunk sequence. The
key/value chunks travel around the ring: at step `s` rank `r` holds those of rank `r - s`, while the
next pair is already on its way (`batch_isend_irecv` posted before the step's compute, waited after
it). Each step the rank attends its two query chunks to the two key chunks it holds, at their global
offsets: a key chunk after a query chunk is skipped, the same chunk is causal, an earlier one is full.
With the zigzag layout every step costs every rank the same two chunk-pairs of work.

Documents. Every rank knows the global document boundaries (`layout.docs`, on the host). A pair whose
key chunk ends before the document of the query chunk's first token shares no document with it and
is skipped (no kernel launch, in forward and backward; a query chunk always keeps the pair with
its own keys, so every row gets a result); the others pass `cu_seqlens` to the kernel,
which skips key tiles outside each query tile's document. The key/values still travel the whole
ring: each rank's chunk is needed by some later rank unless whole chunks are document-disjoint from
every later query chunk, which a fixed ring schedule cannot exploit without changing who sends what.

Partial results merge by log-sum-exp in fp32, whatever the activation dtype, so the error does not
grow with `P` (the bf16 drift of accumulating in the activation dtype does not happen here).

Backward: the key/values make the same trip; each pair's gradients come from `flash_attn_chunk_bwd`
with the final merged `o` and `lse` (its exact share of the full gradient). dq accumulates locally;
each rank keeps its own chunk's share of dK, dV, and the other ranks' shares accumulate in an fp32
buffer that travels with the chunk and, after the last step, one more hop brings home. Bytes sent
per layer: forward `(P - 1)` K, V shards (`(P - 1) / P` of all K, V); backward `(P - 1)` K, V shards
plus `(P - 1)` fp32 dK, dV shards.
"""

import torch
import torch.distributed as dist
from torch import nn

from longctx.kernels.flash_attn import flash_attn_chunk_bwd, flash_attn_chunk_fwd, merge_partials
from longctx.parallel.comm import send_recv
from longctx.parallel.dense import check_zigzag


def _wait(requests) -> None:
    for req in requests:
        req.wait()


class _Ring:
    """The ring geometry of one rank: neighbours and the chunk ids held at each step."""

    def __init__(self, group, layout):
        self.rank, self.size = check_zigzag(layout, group)
        self.group = group
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(self.size))
        self.next = ranks[(self.rank + 1) % self.size]
        self.prev = ranks[(self.rank - 1) % self.size]
        self.chunk = layout.segments[0][1]
        self.docs = layout.docs

    def chunk_ids(self, owner: int) -> tuple[int, int]:
        return owner, 2 * self.size - 1 - owner

    def pairs(self, step: int):
        """(query slot, key slot, query offset, key offset) of every pair worth computing at `step`."""
        owner = (self.rank - step) % self.size
        for qi, q_id in enumerate(self.chunk_ids(self.rank)):
            for ki, k_id in enumerate(self.chunk_ids(owner)):
                q_off, k_off = q_id * self.chunk, k_id * self.chunk
                if k_id > q_id:
                    continue
                if self.docs is not None and k_off + self.chunk <= self.docs.first_visible(q_off, self.chunk):
                    continue
                yield qi, ki, q_off, k_off

    def cu_seqlens(self, device):
        return None if self.docs is None else self.docs.on(device)

    def shift(self, tensor: torch.Tensor, into: torch.Tensor):
        """Send `tensor` to the next rank and receive the previous rank's into `into` (same shape);
        returns the requests. Both must stay untouched until they complete."""
        return send_recv([(tensor, self.next)], [(into, self.prev)], self.group)


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, window, group):
        ring = _Ring(group, layout)
        c = ring.chunk
        n_kv = k.shape[2]
        cu_seqlens = ring.cu_seqlens(q.device)
        kv = torch.cat([k, v], dim=2).contiguous()  # [B, 2 chunks, 2 * Hkv, D] travels as one message
        # Partials merge in fp32 (fp64 for fp64 inputs), whatever the activation dtype.
        work = torch.promote_types(q.dtype, torch.float32)
        outs = [None, None]
        lses = [None, None]
        # Two K,V buffers alternate for the whole ring: one is read while the other receives.
        spare = torch.empty_like(kv) if ring.size > 1 else None
        for step in range(ring.size):
            pending = ring.shift(kv, spare) if step < ring.size - 1 else []
            for qi, ki, q_off, k_off in ring.pairs(step):
                k_c = kv[:, ki * c : (ki + 1) * c, :n_kv]
                v_c = kv[:, ki * c : (ki + 1) * c, n_kv:]
                o, lse = flash_attn_chunk_fwd(
                    q[:, qi * c : (qi + 1) * c], k_c, v_c, q_off, k_off, window=window, cu_seqlens=cu_seqlens
                )
                if outs[qi] is None:
                    outs[qi], lses[qi] = o.to(work), lse
                else:
                    outs[qi], lses[qi] = merge_partials([outs[qi], o.to(work)], [lses[qi], lse])
            _wait(pending)
            if pending:
                kv, spare = spare, kv
        o = torch.cat(outs, dim=1)
        lse = torch.cat(lses, dim=2)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout, ctx.window, ctx.group = layout, window, group
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        # The kernels take o in the activation dtype (it only enters rowsum(dO * O)).
        o = o.to(q.dtype)
        ring = _Ring(ctx.group, ctx.layout)
        c = ring.chunk
        n_kv = k.shape[2]
        cu_seqlens = ring.cu_seqlens(q.device)
        kv = torch.cat([k, v], dim=2).contiguous()
        work = torch.promote_types(q.dtype, torch.float32)
        dq = torch.zeros_like(q, dtype=work)
        # Buffers live for the whole backward: two for the travelling K,V, this rank's own chunk's
        # dK,dV share, one step's share of a visiting chunk, and two for the travelling dK,dV sums.
        spare = torch.empty_like(kv) if ring.size > 1 else None
        own = torch.zeros_like(kv, dtype=work)
        contrib = torch.zeros_like(own) if ring.size > 1 else None
        sums = [torch.empty_like(own), torch.empty_like(own)] if ring.size > 1 else None
        dkv_pending = []
        for step in range(ring.size):
            pending = ring.shift(kv, spare) if step < ring.size - 1 else []
            # Step 0 computes the share of this rank's own chunk, which stays home.
            acc = own if step == 0 else contrib.zero_()
            for qi, ki, q_off, k_off in ring.pairs(step):
                rows = slice(qi * c, (qi + 1) * c)
                cols = slice(ki * c, (ki + 1) * c)
                dq_p, dk_p, dv_p = flash_attn_chunk_bwd(
                    do[:, rows], q[:, rows], kv[:, cols, :n_kv], kv[:, cols, n_kv:], o[:, rows],
                    lse[:, :, rows], q_off, k_off, window=ctx.window, cu_seqlens=cu_seqlens,
                )  # fmt: skip
                dq[:, rows] += dq_p
                acc[:, cols, :n_kv] += dk_p
                acc[:, cols, n_kv:] += dv_p
            if step > 0:
                # The visiting chunk's dK,dV sum (from the previous rank) arrived while this step
                # computed, into sums[step % 2]; add this rank's share (fp32) and pass it on, while
                # the other buffer (its send done) receives the next one.
                _wait(dkv_pending)
                total = sums[step % 2]
                if step == 1:
                    total.copy_(contrib)
                else:
                    total += contrib
                dkv_pending = ring.shift(total, sums[(step + 1) % 2])
            _wait(pending)
            if pending:
                kv, spare = spare, kv
        # The last hop brings every rank the other ranks' shares of its own chunk's dK, dV.
        _wait(dkv_pending)
        dkv = own if ring.size == 1 else own + sums[ring.size % 2]
        return dq.to(q.dtype), dkv[:, :, :n_kv].to(k.dtype), dkv[:, :, n_kv:].to(v.dtype), None, None, None


class RingDenseCore(nn.Module):
    letter = "D"

    def __init__(self, window: int | None, group):
        super().__init__()
        self.window, self.group = window, group

    def forward(self, q, k, v, layout):
        return RingAttention.apply(q, k, v, layout, self.window, self.group)
