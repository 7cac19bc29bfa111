"""Packed, shuffled, resumable training samples, sharded over data-parallel ranks.

    sampler = PackedSampler(docs, seq_len=512, batch_size=8, seed=0, dp_rank=r, dp_size=n)
    batch = sampler.next_batch()     # PackedBatch: tokens [8, 513], doc_starts, answer_mask, sample_ids
    state = sampler.state_dict()     # later: sampler.load_state_dict(state) continues exactly here

How samples are made, all pure functions of (seed, index), so any sample can be recomputed alone:
- The stream. Epoch `e` is every document of the split once, in a seeded random order; the stream is
  epoch 0, then epoch 1, ... back to back (each document ends with EOS). Corpus sample `k` is
  `stream[k * seq_len : k * seq_len + seq_len + 1]`: consecutive samples share one boundary token, so
  every token is a target exactly once per epoch, and nothing is dropped at an epoch's end (the last
  sample of an epoch runs on into the next).
- The order. Corpus samples are visited in blocks of `samples_per_epoch` (= tokens // seq_len), each
  block in a seeded random order, so each block sees each of its samples once.
- The mixture. With `passkey_fraction` f, position `q` of the visiting order is a passkey sample when
  `floor((q + 1) f) > floor(q f)` (exactly f of the positions, evenly spread); the others take the
  corpus samples in turn, so passkey samples are added, never substituted for corpus text.
- The batches. Global batch `b` is positions `[b G, (b + 1) G)`, `G = batch_size * dp_size`, and rank
  `r` takes the `r`-th `batch_size` of them. The state is the number of positions consumed, so a run
  resumed at another data-parallel degree continues at the same place in the stream.
"""

import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from longctx.data.indexed import TokenDocuments
from longctx.data.passkey import PasskeySegment, make_passkey_sample, make_passkey_segment, read_haystack

# Fractions are kept as integers over this denominator so the mixture rule has no rounding drift.
_FRACTION_SCALE = 1_000_000
_DOC_ORDER, _SAMPLE_ORDER, _PASSKEY = 0, 1, 2


@dataclass
class PackedBatch:
    tokens: torch.Tensor  # [B, seq_len + 1] int64
    doc_starts: torch.Tensor  # [B, seq_len + 1] bool: a document begins at this position
    answer_mask: torch.Tensor  # [B, seq_len + 1] bool: the answer digits of a passkey sample
    sample_ids: torch.Tensor  # [B] int64: positions in the global visiting order


@dataclass
class PasskeyMixture:
    fraction: float
    tokenizer: object
    n_digits: int = 5
    # The passkey sample's share of the sequence is uniform in [min_share, 1], the rest corpus text
    # (`make_passkey_segment`); 1.0: it fills the sequence, its answer at the end.
    min_share: float = 1.0


class PackedSampler:
    def __init__(
        self,
        docs: TokenDocuments,
        seq_len: int,
        batch_size: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        passkey: PasskeyMixture | None = None,
        vocab_size: int | None = None,
        allow_repeat: bool = True,
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must lie in [0, {dp_size}), got {dp_rank}")
        # Empty documents add nothing to the stream; leaving them out keeps every lookup productive.
        self.docs = docs.subset(np.flatnonzero(docs.lengths > 0))
        if self.docs.num_tokens == 0:
            raise ValueError(
                f"the dataset {docs.prefix!r} has no tokens in this split ({docs.num_docs} documents); "
                "use a larger corpus (or, for validation, a larger data.val_fraction)"
            )
        if self.docs.num_tokens < seq_len + 1:
            factor = (seq_len + 1) / self.docs.num_tokens
            message = (
                f"the dataset {docs.prefix!r} has {self.docs.num_tokens:,} tokens in this split, fewer than "
                f"one sample of seq_len + 1 = {seq_len + 1:,}: each sample would repeat it {factor:.1f} times"
            )
            if not allow_repeat:
                raise ValueError(
                    f"{message}; use a larger corpus (data.source) or a smaller data.seq_len, or set "
                    "data.allow_repeat=true to train on it anyway"
                )
            warnings.warn(f"{message} (data.allow_repeat=true)", stacklevel=2)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.vocab_size = vocab_size
        self.samples_per_epoch = max(1, self.docs.num_tokens // seq_len)
        self.passkey = passkey
        self.passkey_scale = round(passkey.fraction * _FRACTION_SCALE) if passkey else 0
        self.position = 0
        self._doc_orders: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._sample_orders: OrderedDict[int, np.ndarray] = OrderedDict()
        if self.passkey_scale:
            # Fail now, not mid-run, if a passkey sample cannot fit in seq_len + 1 tokens.
            self._passkey_sample(0)

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed & (2**64 - 1), *key])

    def document_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The documents of `epoch` in stream order, and the cumulative token count after each."""
        if epoch not in self._doc_orders:
            order = self._rng(_DOC_ORDER, epoch).permutation(self.docs.num_docs)
            self._doc_orders[epoch] = (order, np.cumsum(self.docs.lengths[order]))
            if len(self._doc_orders) > 2:
                self._doc_orders.popitem(last=False)
        return self._doc_orders[epoch]

    def corpus_sample(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and document-start mask of corpus sample `k` (stream tokens from k * seq_len)."""
        total = self.docs.num_tokens
        start, need = k * self.seq_len, self.seq_len + 1
        tokens, starts = [], []
        while need:
            epoch, offset = divmod(start, total)
            order, ends = self.document_order(epoch)
            t, s = self.docs.read(offset, need, order, ends)
            tokens.append(t)
            starts.append(s)
            start, need = start + len(t), need - len(t)
        return np.concatenate(tokens), np.concatenate(starts)

    def is_passkey(self, q: int) -> bool:
        return (q + 1) * self.passkey_scale // _FRACTION_SCALE > q * self.passkey_scale // _FRACTION_SCALE

    def corpus_index(self, q: int) -> int:
        """Which corpus sample position `q` of the visiting order takes (q must not be a passkey one)."""
        c = q - q * self.passkey_scale // _FRACTION_SCALE
        block, within = divmod(c, self.samples_per_epoch)
        if block not in self._sample_orders:
            self._sample_orders[block] = self._rng(_SAMPLE_ORDER, block).permutation(self.samples_per_epoch)
            if len(self._sample_orders) > 2:
                self._sample_orders.popitem(last=False)
        return block * self.samples_per_epoch + int(self._sample_orders[block][within])

    def _passkey_sample(self, q: int) -> PasskeySegment:
        rng = self._rng(_PASSKEY, q)
        tok, length = self.passkey.tokenizer, self.seq_len + 1
        drop = [i for i in (tok.eos_id, tok.bos_id) if i >= 0]
        if self.passkey.min_share < 1.0:
            return make_passkey_segment(
                tok, self.docs, length, rng, self.passkey.n_digits, self.passkey.min_share, drop
            )
        hay = read_haystack(self.docs, length, rng, drop_ids=drop)
        s = make_passkey_sample(tok, hay, length, float(rng.random()), rng, self.passkey.n_digits)
        return PasskeySegment(s.tokens, s.answer_start, s.answer_len, s.key, 0, length)

    def sample(self, q: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokens, document starts and answer mask of position `q` of the visiting order."""
        answer = np.zeros(self.seq_len + 1, dtype=bool)
        if self.passkey_scale and self.is_passkey(q):
            s = self._passkey_sample(q)
            answer[s.answer_start : s.answer_start + s.answer_len] = True
            # The text before the passkey sample, the sample, and the text after it are documents.
            starts = np.zeros(self.seq_len + 1, dtype=bool)
            starts[[0, s.segment_start]] = True
            if s.segment_start + s.segment_len <= self.seq_len:
                starts[s.segment_start + s.segment_len] = True
            return s.tokens, starts, answer
        tokens, starts = self.corpus_sample(self.corpus_index(q))
        return tokens, starts, answer

    def batch_at(self, position: int) -> PackedBatch:
        """This rank's share of the global batch that starts at visiting-order position `position`."""
        first = position + self.dp_rank * self.batch_size
        ids = list(range(first, first + self.batch_size))
        tokens, starts, answers = zip(*(self.sample(q) for q in ids))
        batch = PackedBatch(
            tokens=torch.from_numpy(np.stack(tokens)),
            doc_starts=torch.from_numpy(np.stack(starts)),
            answer_mask=torch.from_numpy(np.stack(answers)),
            sample_ids=torch.tensor(ids, dtype=torch.int64),
        )
        if self.vocab_size is not None and int(batch.tokens.max()) >= self.vocab_size:
            raise ValueError(
                f"{self.docs.prefix!r} holds token id {int(batch.tokens.max())}, but model.vocab_size is "
                f"{self.vocab_size}: the dataset was made with a bigger tokenizer; set data.tokenizer to "
                "the one it was made with and model.vocab_size to at least its size"
            )
        return batch

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.dp_size

    def get_batch(self, index: int) -> PackedBatch:
        """Global batch `index` (this rank's share), independent of the sampler's position."""
        return self.batch_at(index * self.global_batch)

    def next_batch(self) -> PackedBatch:
        batch = self.batch_at(self.position)
        self.position += self.global_batch
        return batch

    def state_dict(self) -> dict:
        state = {
            "position": self.position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_tokens": self.docs.num_tokens,
            "num_docs": self.docs.num_docs,
            "passkey_scale": self.passkey_scale,
        }
        if self.passkey and self.passkey.min_share < 1.0:
            # Only when set, so checkpoints from before data.passkey_min_share existed still load.
            state["passkey_min_share"] = self.passkey.min_share
        return state

    def load_state_dict(self, state: dict) -> None:
        check_same_state(
            state, self.state_dict(),
            "data.seq_len, train.seed, data.passkey_fraction and data.passkey_min_share",
        )  # fmt: skip
        self.position = int(state["position"])


def check_same_state(saved: dict, mine: dict, settings: str) -> None:
    """A ValueError naming every key but `position` in which the data loader state `saved` (from a
    checkpoint) differs from this run's `mine`; `settings` names what must match."""
    differ = [k for k in {**mine, **saved} if k != "position" and saved.get(k) != mine.get(k)]
    if differ:
        was = ", ".join(f"{k}={saved.get(k)}" for k in differ)
        now = ", ".join(f"{k}={mine.get(k)}" for k in differ)
        raise ValueError(
            f"the data loader state was saved with {was}, but this run has {now}; resume with the same "
            f"data, {settings}, or start fresh with train.resume=none"
        )
