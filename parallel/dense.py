"""Context-parallel dense attention (D layers).

`allgather`: every rank gathers the keys and values of the whole sequence, then attends its own
query chunks at their global offsets. Simple and exact; it moves `(P - 1) / P` of all K, V per layer
like a ring, but holds the whole K, V at once. With documents, a query chunk attends only the keys
from the start of its first token's document on (nothing earlier is shared with it).
"""

import torch
import torch.distributed as dist
from torch import nn

from longctx.kernels.flash_attn import flash_attn_chunk
from longctx.parallel.comm import all_gather
from longctx.parallel.layout import SeqLayout, zigzag_unshard


def check_zigzag(layout: SeqLayout, group) -> tuple[int, int]:
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    expected = SeqLayout.zigzag(layout.seq_len, rank, size)
    if layout != expected:
        raise ValueError(
            f"context-parallel rank {rank} of {size} expects the zigzag layout {expected}, got {layout}"
        )
    return rank, size


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """The whole sequence `[B, T, ...]` from every rank's zigzag shard `[B, T / P, ...]` (differentiable)."""
    shards = all_gather(x, group)  # [P, B, T/P, ...]
    return zigzag_unshard(list(shards.unbind(0)), dim=1)


class AllGatherDenseCore(nn.Module):
    letter = "D"

    def __init__(self, window: int | None, group):
        super().__init__()
        self.window, self.group = window, group

    def forward(self, q, k, v, layout: SeqLayout):
        check_zigzag(layout, self.group)
        kv = gather_sequence(torch.cat([k, v], dim=2), self.group)  # [B, T, 2 * Hkv, D]
        k_all, v_all = kv.chunk(2, dim=2)
        docs = layout.docs
        cu_seqlens = None if docs is None else docs.on(q.device)
        outs, start_q = [], 0
        for start, n in layout.segments:
            end = start + n
            # Causal: keys after this chunk are never seen, so they are not attended at all; nor are
            # keys before the document of its first query.
            first = 0 if docs is None else docs.first_visible(start, n)
            o, _ = flash_attn_chunk(
                q[:, start_q : start_q + n], k_all[:, first:end], v_all[:, first:end], start, first,
                window=self.window, cu_seqlens=cu_seqlens,
            )  # fmt: skip
            outs.append(o)
            start_q += n
        return torch.cat(outs, dim=1)
