"""Which global tokens a rank holds: the layout every mixer reads its positions from.

A whole sequence is one segment `(0, T)`. Under context parallelism with `P` ranks the sequence is
cut into `2P` equal chunks and rank `r` holds chunks `r` and `2P-1-r` (zigzag), so its layout has two
segments; the causal work per rank is then equal. No process groups here: pure bookkeeping.

A packed sequence also carries its documents (`Documents`, attached as `layout.docs`): the global
start offsets of every document of every sequence in the flash-attn `cu_seqlens` convention. Every
rank holds the same, global boundaries, whichever tokens it holds (docs/documents.md).
"""

import dataclasses
from dataclasses import dataclass, field

import torch

from longctx.kernels.common.docs import doc_bounds


class Documents:
    """Document boundaries of a batch of packed sequences.

    `cu_seqlens` `[B, N + 1]` int32 on the CPU: row `b` holds the global start offset of each of its
    documents (the first is 0), then the sequence length, padded by repeating the length when a row
    has fewer than `N` documents (empty documents change nothing). `per_doc_positions`: RoPE positions
    restart at 0 at each document start (`data.doc_positions=per_doc`) instead of running on globally.
    Kept on the CPU because the sampler makes it there: context-parallel schedules decide on the host,
    without a device sync, which chunk pairs share a document; kernels read a device copy. A plain
    class, not a dataclass, so that engines (DDP, DeepSpeed) moving a forward's inputs leave it be.
    """

    def __init__(self, cu_seqlens: torch.Tensor, per_doc_positions: bool = False):
        self.cu_seqlens, self.per_doc_positions = cu_seqlens, per_doc_positions
        self._device_copies: dict = {}
        cu = cu_seqlens
        if cu.dim() != 2 or cu.shape[1] < 2 or cu.dtype != torch.int32:
            raise ValueError(f"cu_seqlens must be [B, N + 1] int32, got {tuple(cu.shape)} {cu.dtype}")
        if cu.device.type != "cpu":
            raise ValueError("cu_seqlens is kept on the CPU (the host decides skips from it)")
        if bool((cu[:, 0] != 0).any()) or bool((cu[:, 1:] < cu[:, :-1]).any()):
            raise ValueError(f"cu_seqlens rows must start at 0 and not decrease, got {cu.tolist()}")

    def __repr__(self) -> str:
        return f"Documents(num_docs={self.num_docs().tolist()}, per_doc_positions={self.per_doc_positions})"

    @staticmethod
    def from_starts(starts: torch.Tensor, per_doc_positions: bool = False) -> "Documents":
        """From a `[B, T]` bool mask of document starts (the sampler's `doc_starts`, cut to the inputs).
        Token 0 always starts a document: nothing precedes it."""
        starts = starts.cpu().clone()
        starts[:, 0] = True
        b, t = starts.shape
        counts = starts.sum(dim=1)
        n = int(counts.max())
        cu = torch.full((b, n + 1), t, dtype=torch.int32)
        for row in range(b):
            offsets = torch.nonzero(starts[row]).flatten()
            cu[row, : len(offsets)] = offsets.to(torch.int32)
        return Documents(cu, per_doc_positions)

    @property
    def seq_len(self) -> int:
        return int(self.cu_seqlens[0, -1])

    def num_docs(self) -> torch.Tensor:
        """`[B]` documents per sequence."""
        return (self.cu_seqlens[:, 1:] > self.cu_seqlens[:, :-1]).sum(dim=1)

    def on(self, device) -> torch.Tensor:
        """`cu_seqlens` on `device` (copied once per device)."""
        device = torch.device(device)
        if device not in self._device_copies:
            self._device_copies[device] = self.cu_seqlens.to(device)
        return self._device_copies[device]

    def start_of(self, positions: torch.Tensor) -> torch.Tensor:
        """`[B, n]` global start of the document holding each of the global `positions` `[n]`."""
        return doc_bounds(self.on(positions.device), positions)[0]

    def rope_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """RoPE positions of the global `positions` `[n]`: `[n]` as they are, or `[B, n]` counted from
        each token's document start when `per_doc_positions`."""
        return positions - self.start_of(positions) if self.per_doc_positions else positions

    def first_visible(self, q_start: int, q_len: int) -> int:
        """The earliest global key position any query in `[q_start, q_start + q_len)` of any sequence
        may see: the start of the document holding `q_start` (a causal query sees no earlier key)."""
        cu = self.cu_seqlens
        idx = (cu <= q_start).sum(dim=1) - 1  # [B]
        return int(cu.gather(1, idx[:, None]).min())


@dataclass(frozen=True)
class SeqLayout:
    """Global token segments `(start, length)` held locally, in local order."""

    seq_len: int
    segments: tuple[tuple[int, int], ...]
    # The batch's document boundaries, or None: the whole sequence is one document. Not part of the
    # layout's identity (two ranks' layouts compare by their tokens).
    docs: Documents | None = field(default=None, compare=False)

    def with_docs(self, docs: Documents | None) -> "SeqLayout":
        if docs is not None and docs.seq_len != self.seq_len:
            raise ValueError(
                f"documents of a {docs.seq_len}-token sequence given to a {self.seq_len}-token layout"
            )
        return dataclasses.replace(self, docs=docs)

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
