"""Passkey retrieval samples: haystack text with a needle sentence carrying a random number, then the
question and the answer. One function makes them for training (`data.passkey_fraction`) and for the
needle-in-a-haystack evaluation, so both see exactly the same format:

    rng = np.random.default_rng([seed, index])
    hay = read_haystack(docs, 4096, rng, drop_ids=[tok.eos_id])
    s = make_passkey_sample(tok, hay, length=4096, depth=0.5, rng=rng, n_digits=5)
    s.tokens[s.answer_start : s.answer_start + s.answer_len]   # the digits of s.key

The sample is `length` tokens: haystack, needle at `depth` of the haystack, more haystack, question,
answer. The answer is the last `n_digits` tokens (one token per digit), so a model retrieves the key
when its prediction at positions `answer_start - 1 ... length - 2` is the answer's digits. With a
tokenizer that groups digits (Llama 3's takes up to three a token), the key is written one digit token
at a time between the encoded text around it, so the answer still has one position per digit.
"""

from dataclasses import dataclass

import numpy as np

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is {key}"


@dataclass
class PasskeySample:
    tokens: np.ndarray  # [length] int64
    answer_start: int  # position of the first answer digit
    answer_len: int  # n_digits
    key: str
    needle_start: int  # position of the needle's first token
    depth: float


def make_passkey_sample(
    tokenizer,
    haystack_tokens: np.ndarray,
    length: int,
    depth: float,
    rng: np.random.Generator,
    n_digits: int = 5,
) -> PasskeySample:
    """A passkey sample of exactly `length` tokens whose needle sits at `depth` (0: start, 1: end of
    the haystack), with a random `n_digits`-digit key drawn from `rng`.

    Args:
        tokenizer: a `longctx.tokenizer` tokenizer with single-token digits 0-9.
        haystack_tokens: [>= length - overhead] filler tokens (corpus text); the first ones are used.
        length: tokens in the sample (context length; `seq_len + 1` for a training sample).
        depth: fraction of the haystack that comes before the needle, in [0, 1].
        rng: draws the key.
        n_digits: digits of the key.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth must lie in [0, 1], got {depth}")
    if n_digits < 1:
        raise ValueError(f"a passkey needs at least 1 digit, got n_digits={n_digits}")
    key = str(int(rng.integers(10 ** (n_digits - 1), 10**n_digits)))
    needle = tokenizer.encode(NEEDLE.format(key=key))
    question = tokenizer.encode(QUESTION.format(key=key))
    digits = tokenizer.digit_ids()
    key_ids = [digits[int(c)] for c in key]
    if question[-n_digits:] != key_ids:
        # The tokenizer groups digits: spell the key one digit token at a time.
        needle, question = _spelled(tokenizer, NEEDLE, key_ids), _spelled(tokenizer, QUESTION, key_ids)
    n_hay = length - len(needle) - len(question)
    if n_hay < 0:
        raise ValueError(
            f"a passkey sample needs at least {len(needle) + len(question)} tokens (needle, question and "
            f"answer), but the length is {length}; use a longer data.seq_len or data.passkey_fraction=0"
        )
    if len(haystack_tokens) < n_hay:
        raise ValueError(f"the haystack has {len(haystack_tokens)} tokens but this sample needs {n_hay}")
    cut = int(round(depth * n_hay))
    hay = np.asarray(haystack_tokens[:n_hay], dtype=np.int64)
    tokens = np.concatenate([hay[:cut], needle, hay[cut:], question]).astype(np.int64)
    return PasskeySample(tokens, length - n_digits, n_digits, key, cut, depth)


def _spelled(tokenizer, template: str, key_ids: list[int]) -> list[int]:
    """`template` encoded piece by piece around each `{key}`, with `key_ids` in its place."""
    pieces = template.split("{key}")
    out = tokenizer.encode(pieces[0]) if pieces[0] else []
    for piece in pieces[1:]:
        out += key_ids + (tokenizer.encode(piece) if piece else [])
    return out


def read_haystack(docs, n_tokens: int, rng: np.random.Generator, drop_ids=()) -> np.ndarray:
    """`n_tokens` of corpus text from a random place in `docs` (a `TokenDocuments`), documents in
    their stored order, wrapping around at the end; tokens in `drop_ids` (EOS, BOS) are left out."""
    if docs.num_tokens == 0:
        raise ValueError(f"the dataset {docs.prefix!r} has no tokens to make a passkey haystack from")
    if n_tokens == 0:
        return np.zeros(0, dtype=np.int64)
    pos = int(rng.integers(docs.num_tokens))
    drop = np.asarray(list(drop_ids), dtype=np.int64)
    pieces, have, unproductive = [], 0, 0
    while have < n_tokens:
        if pos == docs.num_tokens:
            pos = 0
        count = min(n_tokens - have + 64, docs.num_tokens - pos)
        chunk, _ = docs.read(pos, count)
        pos += count
        kept = chunk[~np.isin(chunk, drop)][: n_tokens - have]
        pieces.append(kept)
        have += len(kept)
        unproductive = 0 if len(kept) else unproductive + count
        if unproductive > docs.num_tokens:
            raise ValueError(f"the dataset {docs.prefix!r} holds only dropped tokens ({list(drop_ids)})")
    return np.concatenate(pieces)
