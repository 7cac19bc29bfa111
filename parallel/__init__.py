"""Context parallelism: sequence layouts, zigzag sharding, and (with process groups) the
context-parallel versions of every mixer's core op."""

from longctx.parallel.comm import comm_stats, reset_comm_stats
from longctx.parallel.context import parallelize_model
from longctx.parallel.layout import SeqLayout, zigzag_chunk_len, zigzag_shard, zigzag_unshard

__all__ = [
    "SeqLayout",
    "comm_stats",
    "parallelize_model",
    "reset_comm_stats",
    "zigzag_chunk_len",
    "zigzag_shard",
    "zigzag_unshard",
]
