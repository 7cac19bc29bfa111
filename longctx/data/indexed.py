"""Megatron indexed datasets (`PREFIX.bin` tokens + `PREFIX.idx` index), read as documents of tokens.

    docs = TokenDocuments.open("cache/data-1a2b/train", rebuild_hint="rerun `longctx data prepare`")
    docs.document(3)          # np.ndarray of the 4th document's tokens
    docs.read(1000, 512)      # 512 tokens of the documents in stored order, from token 1000

The files are written by megatron-core's `IndexedDatasetBuilder` and opened with its
`IndexedDataset`, so datasets made by Megatron-LM's `tools/preprocess_data.py` work as they are.
A document is the concatenation of its sequences (Megatron may store one per sentence); the tokens
of a document are contiguous in the `.bin`, so they are read straight from a memory map. Opening
checks that `.bin` and `.idx` agree and raises a ValueError naming the file and how to rebuild it.
"""

import functools
import struct
from pathlib import Path

import numpy as np

# The .idx layout (megatron/core/datasets/indexed_dataset.py): magic, u64 version, u8 dtype code,
# u64 sequence count, u64 document-index count, then the arrays.
_INDEX_MAGIC = b"MMIDIDX\x00\x00"
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8


def _megatron_indexed():
    """megatron-core's indexed_dataset module, imported quietly (megatron.core warns about optional
    fused kernels it does not need here)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def token_dtype(vocab_size: int) -> type:
    """The token dtype Megatron-LM picks for a vocabulary (uint16 below 65500 tokens, else int32)."""
    return np.uint16 if vocab_size < 65500 else np.int32


class TokenDocuments:
    """The documents of one indexed dataset, or of a subset of its documents (a split)."""

    def __init__(self, prefix: str, tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
        self.prefix = prefix
        self.tokens = tokens  # [num_tokens of the whole file], memory-mapped
        self.starts = starts  # [num_docs] int64 token offset of each document in `tokens`
        self.lengths = lengths  # [num_docs] int64
        self.num_docs = len(starts)
        self.num_tokens = int(lengths.sum())

    @classmethod
    def open(cls, prefix: str | Path, rebuild_hint: str) -> "TokenDocuments":
        prefix = str(prefix)
        bin_path, idx_path = Path(prefix + ".bin"), Path(prefix + ".idx")
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise ValueError(f"the Megatron dataset file {str(path)!r} is missing; {rebuild_hint}")
        _check_index_header(idx_path, rebuild_hint)
        IndexedDataset = _megatron_indexed().IndexedDataset
        try:
            # An empty .bin cannot be memory-mapped; megatron then reads it through a file handle.
            dataset = IndexedDataset(prefix, mmap=bin_path.stat().st_size > 0)
            dtype = np.dtype(dataset.index.dtype)
            # Copies: the views die with `dataset`'s memory maps.
            lengths = np.array(dataset.sequence_lengths, dtype=np.int64)
            pointers = np.array(dataset.index.sequence_pointers, dtype=np.int64)
            doc_index = np.array(dataset.document_indices, dtype=np.int64)
        except (AssertionError, ValueError, KeyError, OSError) as e:
            raise ValueError(
                f"the index {str(idx_path)!r} is truncated or not a Megatron index "
                f"({e or type(e).__name__}); {rebuild_hint}"
            ) from e
        del dataset
        expected_pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * dtype.itemsize
        expected_bytes = int(lengths.sum()) * dtype.itemsize
        actual_bytes = bin_path.stat().st_size
        if actual_bytes != expected_bytes:
            what = "truncated" if actual_bytes < expected_bytes else "longer than its index says"
            raise ValueError(
                f"{str(bin_path)!r} is {what}: it has {actual_bytes} bytes but {str(idx_path)!r} describes "
                f"{expected_bytes} ({len(lengths)} sequences of {dtype.name}); the two files do not belong "
                f"together or a write was cut short; {rebuild_hint}"
            )
        if len(lengths) and not np.array_equal(pointers, expected_pointers):
            raise ValueError(
                f"{str(idx_path)!r} does not describe sequences stored back to back in {str(bin_path)!r}; "
                f"{rebuild_hint}"
            )
        if len(doc_index) == 0 or doc_index[0] != 0 or np.any(np.diff(doc_index) < 0):
            raise ValueError(f"{str(idx_path)!r} has a corrupt document index; {rebuild_hint}")
        tokens = np.memmap(bin_path, dtype=dtype, mode="r") if expected_bytes else np.zeros(0, dtype)
        seq_starts = np.concatenate([[0], np.cumsum(lengths)])
        starts = seq_starts[doc_index[:-1]]
        return cls(prefix, tokens, starts, seq_starts[doc_index[1:]] - starts)

    def subset(self, doc_ids: np.ndarray) -> "TokenDocuments":
        return TokenDocuments(self.prefix, self.tokens, self.starts[doc_ids], self.lengths[doc_ids])

    def document(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.starts[i] : self.starts[i] + self.lengths[i]])

    @functools.cached_property
    def ends(self) -> np.ndarray:
        """[num_docs] int64 end offset of each document in the documents' stored order."""
        return np.cumsum(self.lengths)

    def read(
        self, start: int, count: int, order: np.ndarray | None = None, ends: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Up to `count` tokens from token `start` of the documents concatenated in `order`
        (default: stored order), stopping at the end of the concatenation.

        `ends` is `cumsum(self.lengths[order])` (cached by the caller). Returns the tokens (int64)
        and a bool mask of the positions where a document begins.
        """
        if order is None:
            ends = self.ends
        out = np.empty(count, dtype=np.int64)
        doc_start = np.zeros(count, dtype=bool)
        j = int(np.searchsorted(ends, start, side="right"))
        pos, filled = start, 0
        while filled < count and j < len(ends):
            doc = j if order is None else order[j]
            inner = pos - (ends[j] - self.lengths[doc])
            take = min(int(self.lengths[doc] - inner), count - filled)
            a = self.starts[doc] + inner
            out[filled : filled + take] = self.tokens[a : a + take]
            if take:
                doc_start[filled] = inner == 0
            filled, pos, j = filled + take, pos + take, j + 1
        return out[:filled], doc_start[:filled]


def _check_index_header(idx_path: Path, rebuild_hint: str) -> None:
    """Check the `.idx` header and size before megatron-core reads it (its reader asserts, and a
    half-built reader then fails again in `__del__`)."""
    with open(idx_path, "rb") as f:
        header = f.read(_HEADER_BYTES)
    size = idx_path.stat().st_size
    if len(header) < _HEADER_BYTES or header[:9] != _INDEX_MAGIC:
        raise ValueError(
            f"the index {str(idx_path)!r} is truncated or not a Megatron index (bad header); {rebuild_hint}"
        )
    version, dtype_code, num_seqs, num_docs = struct.unpack("<QBQQ", header[9:])
    if version != 1 or not 1 <= dtype_code <= 8:
        raise ValueError(
            f"the index {str(idx_path)!r} has version {version} and dtype code {dtype_code}, not a Megatron "
            f"index this reader knows (version 1, codes 1-8); {rebuild_hint}"
        )
    # Sequence lengths (int32), sequence pointers (int64), document indices (int64).
    expected = _HEADER_BYTES + num_seqs * (4 + 8) + num_docs * 8
    if size < expected:
        raise ValueError(
            f"the index {str(idx_path)!r} is truncated: {size} bytes where {num_seqs} sequences and "
            f"{num_docs - 1} documents need {expected}; {rebuild_hint}"
        )


class IndexedWriter:
    """Writes documents into `PREFIX.bin`/`PREFIX.idx` with megatron-core's builder."""

    def __init__(self, prefix: Path, dtype: type):
        IndexedDatasetBuilder = _megatron_indexed().IndexedDatasetBuilder
        self.prefix = prefix
        self.builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
        self.num_docs = 0
        self.num_tokens = 0

    def add(self, ids: np.ndarray) -> None:
        # One sequence per document, as Megatron-LM's preprocess_data.py writes without sentence splitting.
        self.builder.add_document(ids, [len(ids)])
        self.num_docs += 1
        self.num_tokens += len(ids)

    def finish(self) -> None:
        self.builder.finalize(str(self.prefix) + ".idx")
