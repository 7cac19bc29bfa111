"""Tokenizers: SentencePiece (trained on the corpus, or any `.model`) and Hugging Face `tokenizer.json`.

    longctx tokenizer train --config configs/tiny.yaml --out tok.model
    tok = open_tokenizer("tok.model")            # or a tokenizer.json, or a folder holding either

A trained tokenizer splits digits into single tokens (the needle evaluation compares answers digit
by digit), falls back to bytes for unknown characters, and keeps text as it is (no normalisation,
whitespace preserved, a newline is its own token), so decoding gives the text back. A checkpoint's
own tokenizer (Llama 2's `tokenizer.model`, Llama 3's or Qwen2's `tokenizer.json`) is used as it is:
both kinds have the same interface (`encode`, `encode_batch`, `decode`, `eos_id`, `bos_id`,
`digit_ids`, `vocab_size`, `path`).
"""

import hashlib
import io
import json
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

    def encode_batch(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads or -1)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def digit_ids(self) -> list[int]:
        """Token id of each digit 0-9 (each digit is one token)."""
        return [self.sp.piece_to_id(str(d)) for d in range(10)]


def _special_token(value) -> str | None:
    # tokenizer_config.json spells a special token as a string or as {"content": ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (the `tokenizers` library). EOS and BOS come from
    `tokenizer_config.json` beside it, else from `config.json`'s `eos_token_id` / `bos_token_id`."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} not found")
        self.path = path
        try:
            self.backend = Backend.from_file(str(path))
        except Exception as e:  # the library raises its own Exception subclass on bad files
            raise ValueError(f"{str(path)!r} is not a Hugging Face tokenizer.json: {e}") from e
        self.eos_id = self._special(path.parent, "eos")
        self.bos_id = self._special(path.parent, "bos")

    def _special(self, folder: Path, kind: str) -> int:
        config = folder / "tokenizer_config.json"
        if config.is_file():
            token = _special_token(json.loads(config.read_text()).get(f"{kind}_token"))
            if token is not None and self.backend.token_to_id(token) is not None:
                return self.backend.token_to_id(token)
        model_config = folder / "config.json"
        if model_config.is_file():
            value = json.loads(model_config.read_text()).get(f"{kind}_token_id")
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int):
                return value
        return -1

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
        # The library parallelises over its own thread pool (RAYON_NUM_THREADS caps it).
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def digit_ids(self) -> list[int]:
        ids = [self.backend.token_to_id(str(d)) for d in range(10)]
        if any(i is None for i in ids):
            missing = [str(d) for d, i in enumerate(ids) if i is None]
            raise ValueError(
                f"the tokenizer {str(self.path)!r} has no single token for the digits {', '.join(missing)}, "
                "so a passkey answer cannot be written one digit a token"
            )
        return ids


def find_tokenizer_file(folder: str | Path) -> Path | None:
    """A folder's `tokenizer.json` (preferred) or `tokenizer.model`, or None."""
    for name in ("tokenizer.json", "tokenizer.model"):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def open_tokenizer(path: str | Path):
    """The tokenizer at `path`: a SentencePiece `.model`, a `tokenizer.json`, or a folder holding one
    (`tokenizer.json` first); `hf:DIR` is the folder DIR."""
    text = str(path)
    path = Path(text[3:] if text.startswith("hf:") else text)
    if path.is_dir():
        found = find_tokenizer_file(path)
        if found is None:
            raise FileNotFoundError(
                f"{str(path)!r} holds no tokenizer.json or tokenizer.model; point data.tokenizer at the "
                "tokenizer file itself, or leave it empty to train one on the corpus"
            )
        path = found
    if path.suffix == ".json":
        return HFTokenizer(path)
    return Tokenizer(path)


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
            "A smaller model.vocab_size usually fixes it (no more pieces than the corpus can fill), or a "
            "larger one when it is under 256 byte tokens + the corpus's characters"
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
        tok = open_tokenizer(model_path)
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


def copy_tokenizer(tok, run_dir: str | Path) -> None:
    """Keep the run's tokenizer in `run_dir` (`tokenizer.model`, or `tokenizer.json` with the files
    that name its special tokens), removing one of the other kind a previous run left there."""
    run_dir = Path(run_dir)
    if isinstance(tok, HFTokenizer):
        files = {"tokenizer.json": tok.path}
        files.update({n: tok.path.parent / n for n in ("tokenizer_config.json", "special_tokens_map.json")})
        stale = ["tokenizer.model"]
    else:
        files, stale = {"tokenizer.model": tok.path}, ["tokenizer.json"]
    for name in stale:
        (run_dir / name).unlink(missing_ok=True)
    for name, src in files.items():
        dest = run_dir / name
        if src.is_file() and (not dest.exists() or dest.resolve() != src.resolve()):
            shutil.copyfile(src, dest)
