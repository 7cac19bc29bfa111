"""Training data: documents -> tokens -> packed, shuffled, resumable samples."""

import torch

from longctx.data.corpus import builtin_documents, iter_documents
from longctx.data.sampler import PackedSampler


def tokenize_corpus(source: str, tokenizer) -> torch.Tensor:
    """All documents of `source`, each followed by EOS, as one int32 token stream."""
    ids = []
    for doc_ids in tokenizer.encode_batch(list(iter_documents(source))):
        ids.extend(doc_ids)
        ids.append(tokenizer.eos_id)
    return torch.tensor(ids, dtype=torch.int32)


def build_sampler(cfg, tokenizer, dp_rank: int = 0, dp_size: int = 1) -> PackedSampler:
    tokens = tokenize_corpus(cfg.data.source, tokenizer)
    return PackedSampler(tokens, cfg.data.seq_len, cfg.train.batch_size, cfg.train.seed, dp_rank, dp_size)


__all__ = ["PackedSampler", "build_sampler", "builtin_documents", "iter_documents", "tokenize_corpus"]
