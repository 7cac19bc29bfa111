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

Training uses `make_passkey_segment`: such a sample, of random length, at a random offset of a longer
sequence of corpus text, so the answer does not always sit at the same absolute positions.
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
    key, needle, question = _needle_and_question(tokenizer, rng, n_digits)
    return _assemble(key, needle, question, haystack_tokens, length, depth)


def _needle_and_question(tokenizer, rng: np.random.Generator, n_digits: int) -> tuple[str, list, list]:
    """A random `n_digits`-digit key and the token ids of the needle and of the question + answer."""
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
    return key, needle, question


def _assemble(key: str, needle: list, question: list, haystack_tokens, length: int, depth: float):
    n_digits = len(key)
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


@dataclass
class PasskeySegment:
    tokens: np.ndarray  # [length] int64: corpus text, the passkey sample, corpus text
    answer_start: int  # position of the first answer digit in `tokens`
    answer_len: int
    key: str
    segment_start: int  # where the passkey sample begins
    segment_len: int  # its length (it ends with the answer)


def make_passkey_segment(
    tokenizer,
    docs,
    length: int,
    rng: np.random.Generator,
    n_digits: int = 5,
    min_share: float = 0.25,
    drop_ids=(),
) -> PasskeySegment:
    """`length` tokens of corpus text holding one passkey sample (`make_passkey_sample`) whose length
    is uniform between `min_share * length` (at least what needle and question need) and `length`,
    at a uniform offset, its needle at a uniform depth. The answer thus lands at varying absolute
    positions, as it does in needle prompts of varying length. `min_share=1.0`: the sample is the
    whole sequence (the answer at its end).

    Args:
        tokenizer: as for `make_passkey_sample`.
        docs: `TokenDocuments` the haystack and the surrounding text are read from (`read_haystack`).
        length: tokens of the whole sequence (`seq_len + 1` for a training sample).
        rng: draws the key, the segment's length, offset and depth, and where the text is read.
        n_digits: digits of the key.
        min_share: the shortest segment as a share of `length`, in (0, 1].
        drop_ids: token ids left out of the text (EOS, BOS).
    """
    if not 0.0 < min_share <= 1.0:
        raise ValueError(f"the passkey segment's min_share must lie in (0, 1], got {min_share}")
    key, needle, question = _needle_and_question(tokenizer, rng, n_digits)
    overhead = len(needle) + len(question)
    if overhead > length:
        raise ValueError(
            f"a passkey sample needs at least {overhead} tokens (needle, question and answer), but the "
            f"length is {length}; use a longer data.seq_len or data.passkey_fraction=0"
        )
    shortest = min(length, max(overhead, int(np.ceil(min_share * length))))
    segment_len = int(rng.integers(shortest, length + 1))
    offset = int(rng.integers(0, length - segment_len + 1))
    depth = float(rng.random())
    text = read_haystack(docs, length - overhead, rng, drop_ids=drop_ids)
    n_hay = segment_len - overhead
    sample = _assemble(key, needle, question, text[offset : offset + n_hay], segment_len, depth)
    tokens = np.concatenate([text[:offset], sample.tokens, text[offset + n_hay :]]).astype(np.int64)
    return PasskeySegment(tokens, offset + sample.answer_start, n_digits, key, offset, segment_len)


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
