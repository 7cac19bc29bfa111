"""Training data: corpus -> sentencepiece -> Megatron indexed dataset -> packed, resumable samples.

tok = load_tokenizer(cfg)
data = prepare_dataset(cfg, tok)                      # cached in data.cache_dir
train, val = build_samplers(cfg, data, tok, dp_rank, dp_size)
batch = train.next_batch()                            # PackedBatch
"""

from longctx.data.corpus import Corpus, builtin_documents, iter_documents, megatron_prefix
from longctx.data.indexed import TokenDocuments
from longctx.data.passkey import (
    PasskeySample,
    PasskeySegment,
    make_passkey_sample,
    make_passkey_segment,
    read_haystack,
)
from longctx.data.prepare import PreparedData, load_tokenizer, prepare_dataset
from longctx.data.sampler import PackedBatch, PackedSampler, PasskeyMixture


def build_samplers(
    cfg, data: PreparedData, tokenizer, dp_rank: int = 0, dp_size: int = 1, seq_len: int | None = None
) -> tuple[PackedSampler, PackedSampler | None]:
    """The training sampler (with the passkey mixture) and the validation sampler (corpus text only;
    None when the validation split is empty), at `seq_len` (default `data.seq_len`)."""
    passkey = None
    if cfg.data.passkey_fraction > 0:
        passkey = PasskeyMixture(
            cfg.data.passkey_fraction, tokenizer, cfg.data.passkey_digits, cfg.data.passkey_min_share
        )
    common = dict(
        seq_len=seq_len or cfg.data.seq_len,
        batch_size=cfg.train.batch_size,
        seed=cfg.train.seed,
        dp_rank=dp_rank,
        dp_size=dp_size,
        vocab_size=cfg.model.vocab_size,
    )
    train = PackedSampler(data.train, passkey=passkey, allow_repeat=cfg.data.allow_repeat, **common)
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
    "prepare_dataset",
    "read_haystack",
]
