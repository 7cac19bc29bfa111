"""Document boundaries of packed sequences, as the kernels take them.

Ops take `cu_seqlens` `[B, N + 1]` int32 (flash-attn's convention, one row per sequence): the global
start offset of each document, then the sequence length, padded by repeating the length. A kernel
never builds a `[T, T]` mask from it; it derives per-token bounds once per call:

    start, end = doc_bounds(cu_seqlens, positions)   # [B, n] each: the token's document [start, end)

A causal query at `p` sees exactly the keys in `[start(p), p]`, so a query's document start is all
the forward needs (and its loop over key tiles begins at the start of its first query's document);
a key's document end bounds the queries that see it in the backward. Positions are global, so one
query chunk and one key chunk of a context-parallel schedule use them as they are.
"""

import torch


def doc_bounds(cu_seqlens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(start, end)` `[B, n]` int32: the global `[start, end)` of the document holding each global
    position of `positions` `[n]`, for every sequence of `cu_seqlens` `[B, N + 1]`."""
    cu = cu_seqlens.to(device=positions.device, dtype=torch.int64)
    pos = positions.to(torch.int64)[None].expand(cu.shape[0], -1).contiguous()
    # The last document start <= pos (padding entries equal T and are never <= a real position).
    idx = (torch.searchsorted(cu, pos, right=True) - 1).clamp(0, cu.shape[1] - 2)
    return cu.gather(1, idx).to(torch.int32), cu.gather(1, idx + 1).to(torch.int32)


def doc_starts_mask(cu_seqlens: torch.Tensor, offset: int, length: int, device) -> torch.Tensor:
    """`[B, length]` bool: which of the global positions `[offset, offset + length)` start a document."""
    positions = torch.arange(offset, offset + length, device=device)
    start, _ = doc_bounds(cu_seqlens, positions)
    return start == positions.to(torch.int32)[None]


def check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int) -> None:
    if cu_seqlens.dim() != 2 or cu_seqlens.shape[0] != batch or cu_seqlens.shape[1] < 2:
        raise ValueError(
            f"cu_seqlens must be [B, N + 1] = [{batch}, N + 1] document start offsets per sequence, got "
            f"{tuple(cu_seqlens.shape)}; build it with longctx.parallel.layout.Documents"
        )
