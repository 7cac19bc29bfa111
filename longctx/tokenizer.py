"""SentencePiece tokenizer: trained on the corpus or loaded from a `.model` file.

    longctx tokenizer train --config configs/tiny.yaml --out tok.model

Digits are split into single tokens (the needle evaluation compares answers digit by digit), unknown
characters fall back to bytes, and text is kept as it is (no normalisation, whitespace preserved, a
newline is its own token), so decoding gives the text back.
"""

import hashlib
import io
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm


class Tokenizer:
    def __init__(self, model_path: str | Path):
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer model {str(path)!r} not found; train one with `longctx tokenizer train` or "
                "leave data.tokenizer empty to train one on the corpus"
            )
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{str(path)!r} is not a SentencePiece model: {e}") from e

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def digit_ids(self) -> list[int]:
        """Token id of each digit 0-9 (each digit is one token)."""
        return [self.sp.piece_to_id(str(d)) for d in range(10)]


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_path: str | Path, num_threads: int = 0
) -> Path:
    """Train a BPE SentencePiece model on `texts` (one document each) and write it atomically."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    docs = (t for t in texts if t)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=docs,
            model_writer=buffer,
            vocab_size=vocab_size,
            model_type="bpe",
            split_digits=True,
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n"],
            max_sentence_length=1 << 20,
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            num_threads=num_threads or max(1, os.cpu_count() or 1),
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(
            f"SentencePiece could not train a {vocab_size}-token vocabulary on this corpus: {e}. "
            "A smaller model.vocab_size usually fixes it (it needs at least 256 byte tokens + the "
            "corpus's characters)"
        ) from e
    tmp = out_path.with_suffix(f"{out_path.suffix}.{os.getpid()}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, out_path)
    return out_path


def load_or_train_tokenizer(
    model_path: str, vocab_size: int, texts_fn, cache_dir: str | Path, cache_key: str
) -> Tokenizer:
    """Load `model_path`, or train on `texts_fn()` once and cache it under `cache_dir`."""
    if model_path:
        tok = Tokenizer(model_path)
    else:
        digest = hashlib.sha256(f"{cache_key}|{vocab_size}|bpe-digits-bytes-v1".encode()).hexdigest()[:16]
        cached = Path(cache_dir) / f"tokenizer-{digest}.model"
        if not cached.is_file():
            train_tokenizer(texts_fn(), vocab_size, cached)
        tok = Tokenizer(cached)
    if tok.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer {str(tok.path)!r} has {tok.vocab_size} tokens but model.vocab_size is "
            f"{vocab_size}; set model.vocab_size={tok.vocab_size} (or larger)"
        )
    return tok


def copy_tokenizer(tok: Tokenizer, run_dir: str | Path) -> None:
    dest = Path(run_dir) / "tokenizer.model"
    if dest.resolve() != tok.path.resolve():
        shutil.copyfile(tok.path, dest)
