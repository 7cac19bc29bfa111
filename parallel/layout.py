"""Which global tokens a rank holds: the layout every mixer reads its positions from.

A whole sequence is one segment `(0, T)`. Under context parallelism with `P` ranks the sequence is
cut into `2P` equal chunks and rank `r` holds chunks `r` and `2P-1-r` (zigzag), so its layout has two
segments; the causal work per rank is then equal. No process groups here: pure bookkeeping.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SeqLayout:
    """Global token segments `(start, length)` held locally, in local order."""

    seq_len: int
    segments: tuple[tuple[int, int], ...]

    @staticmethod
    def full(seq_len: int) -> "SeqLayout":
        return SeqLayout(seq_len, ((0, seq_len),))

    @staticmethod
    def zigzag(seq_len: int, cp_rank: int, cp_size: int) -> "SeqLayout":
        chunk = zigzag_chunk_len(seq_len, cp_size)
        first, second = cp_rank, 2 * cp_size - 1 - cp_rank
        return SeqLayout(seq_len, ((first * chunk, chunk), (second * chunk, chunk)))

    @property
    def local_len(self) -> int:
        return sum(n for _, n in self.segments)

    @property
    def is_full(self) -> bool:
        return self.segments == ((0, self.seq_len),)

    def positions(self, device=None) -> torch.Tensor:
        """Global position of every local token, `[T_local]` int64."""
        return torch.cat([torch.arange(s, s + n, device=device) for s, n in self.segments])


def zigzag_chunk_len(seq_len: int, cp_size: int, block: int = 1) -> int:
    if seq_len % (2 * cp_size * block):
        raise ValueError(
            f"sequence length {seq_len} does not split into {2 * cp_size} chunks of whole "
            f"{block}-token blocks; use a multiple of {2 * cp_size * block}"
        )
    return seq_len // (2 * cp_size)


def zigzag_shard(x: torch.Tensor, cp_rank: int, cp_size: int, dim: int = 1) -> torch.Tensor:
    """This rank's zigzag share of `x` along `dim` (chunks `r` and `2P-1-r`, concatenated)."""
    if cp_size == 1:
        return x
    zigzag_chunk_len(x.shape[dim], cp_size)
    chunks = x.chunk(2 * cp_size, dim=dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=dim)


def zigzag_unshard(shards: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of `zigzag_shard`: the full sequence from every rank's shard, in rank order."""
    cp_size = len(shards)
    if cp_size == 1:
        return shards[0]
    chunks = [None] * (2 * cp_size)
    for r, shard in enumerate(shards):
        first, second = shard.chunk(2, dim=dim)
        chunks[r], chunks[2 * cp_size - 1 - r] = first, second
    return torch.cat(chunks, dim=dim)
