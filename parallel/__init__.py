"""Context parallelism: sequence layouts, zigzag sharding, and (with process groups) the
context-parallel versions of every mixer's core op."""

from longctx.parallel.layout import SeqLayout, zigzag_chunk_len, zigzag_shard, zigzag_unshard

__all__ = ["SeqLayout", "zigzag_chunk_len", "zigzag_shard", "zigzag_unshard"]
