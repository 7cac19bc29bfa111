"""Training data: corpus -> sentencepiece -> Megatron indexed dataset -> packed, resumable samples.

tok = load_tokenizer(cfg.data, cfg.model.vocab_size)
data = prepare_dataset(cfg.data, tok)                 # cached in data.cache_dir
train, val = build_samplers(cfg.data, data, tok, batch_size=8, seed=0, vocab_size=tok.vocab_size)
batch = train.next_batch()                            # PackedBatch
"""

from longctx.config import DataConfig
from longctx.data.corpus import Corpus, builtin_documents, iter_documents, megatron_prefix
from longctx.data.indexed import TokenDocuments
from longctx.data.passkey import (
    PasskeySample,
    PasskeySegment,
    make_passkey_sample,
    make_passkey_segment,
    read_haystack,
)
from longctx.data.prepare import PreparedData, load_tokenizer, open_dataset, prepare_dataset
from longctx.data.sampler import PackedBatch, PackedSampler, PasskeyMixture


def build_samplers(
    cfg: DataConfig,
    data: PreparedData,
    tokenizer,
    *,
    batch_size: int,
    seed: int,
    vocab_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    seq_len: int | None = None,
) -> tuple[PackedSampler, PackedSampler | None]:
    """The training sampler (with the passkey mixture) and the validation sampler (corpus text only;
    None when the validation split is empty) of the `data` config section `cfg`: `batch_size`
    sequences of `seq_len` (default `cfg.seq_len`) tokens per data-parallel rank, ids below
    `vocab_size`, drawn in the order `seed` gives."""
    passkey = None
    if cfg.passkey_fraction > 0:
        passkey = PasskeyMixture(cfg.passkey_fraction, tokenizer, cfg.passkey_digits, cfg.passkey_min_share)
    common = dict(
        seq_len=seq_len or cfg.seq_len,
        batch_size=batch_size,
        seed=seed,
        dp_rank=dp_rank,
        dp_size=dp_size,
        vocab_size=vocab_size,
    )
    train = PackedSampler(data.train, passkey=passkey, allow_repeat=cfg.allow_repeat, **common)
    val = PackedSampler(data.val, **common) if data.val.num_tokens else None
    return train, val


__all__ = [
    "Corpus",
    "PackedBatch",
    "PackedSampler",
    "PasskeyMixture",
    "PasskeySample",
    "PasskeySegment",
    "PreparedData",
    "TokenDocuments",
    "build_samplers",
    "builtin_documents",
    "iter_documents",
    "load_tokenizer",
    "make_passkey_sample",
    "make_passkey_segment",
    "megatron_prefix",
    "open_dataset",
    "prepare_dataset",
    "read_haystack",
]
