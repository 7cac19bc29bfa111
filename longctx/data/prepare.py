"""`longctx data prepare`: a corpus tokenized once into Megatron indexed datasets, cached.

    tok = load_tokenizer(cfg.data, cfg.model.vocab_size)  # data.tokenizer, or trained on the corpus (cached)
    data = prepare_dataset(cfg.data, tok)         # data.train, data.val: TokenDocuments
    data = open_dataset(cfg.data, tok)            # what another process prepared; an error if nothing

Under torchrun one process per node prepares while the others wait, then open what it wrote
(`DistInfo.writer_first(lambda: prepare_dataset(...), lambda: open_dataset(...))`).

Every document is tokenized (sentencepiece's own threads, `data.num_workers`), followed by EOS,
and written with megatron-core's `IndexedDatasetBuilder` to `train.bin/.idx` or `val.bin/.idx`:
document `i` (in corpus order) goes to validation when `floor((i + 1) f) > floor(i f)`,
`f = data.val_fraction`, so exactly `floor(n f)` documents, evenly spread, and the split does not move
when the corpus grows at the end. The entry `cache_dir/data-<hash>/` is keyed by the corpus's identity
(paths, sizes, mtimes), the tokenizer file's hash and the settings; it is written under a temporary
name and renamed when complete, so an entry that exists is whole. `data.source` may also name an
existing Megatron dataset prefix: it is used in place, split by the same rule at load time.
"""

import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from longctx.config import DataConfig
from longctx.data.corpus import Corpus, megatron_prefix
from longctx.data.indexed import IndexedWriter, TokenDocuments, token_dtype

FORMAT_VERSION = "longctx-indexed-v1"
# Tokenizer training reads at most this much text: SentencePiece samples sentences from it anyway.
TOKENIZER_MAX_CHARS = 200_000_000
_FRACTION_SCALE = 1_000_000


@dataclass
class PreparedData:
    train: TokenDocuments
    val: TokenDocuments
    path: Path  # the cache entry, or the Megatron prefix used in place
    meta: dict
    built: bool = False  # this call tokenized the corpus (it was not cached)


def load_tokenizer(data: DataConfig, vocab_size: int):
    """`data.tokenizer`, or a tokenizer of `vocab_size` tokens trained on `data.source` once and cached
    in `data.cache_dir` (under torchrun one process per node trains it first: `DistInfo.writer_first`).
    """
    from longctx.tokenizer import load_or_train_tokenizer

    prefix = megatron_prefix(data.source)
    if prefix is not None and not data.tokenizer:
        raise ValueError(
            f"data.source {data.source!r} is an already tokenized Megatron dataset, so no tokenizer can "
            "be trained on it; set data.tokenizer to the tokenizer it was made with (a SentencePiece .model, "
            "a tokenizer.json or a folder holding one)"
        )

    if prefix is not None:
        return load_or_train_tokenizer(data.tokenizer, vocab_size, None, data.cache_dir, "")
    corpus = Corpus(data.source, data.text_field, data.cache_dir)
    return load_or_train_tokenizer(
        data.tokenizer,
        vocab_size,
        lambda: corpus.documents(max_chars=TOKENIZER_MAX_CHARS),
        data.cache_dir,
        cache_key=corpus.identity(),
    )


def is_validation(index: np.ndarray | int, fraction: float):
    """Whether document `index` (corpus order) belongs to the validation split."""
    scale = round(fraction * _FRACTION_SCALE)
    return (index + 1) * scale // _FRACTION_SCALE > index * scale // _FRACTION_SCALE


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_entry(data: DataConfig, tokenizer, corpus: Corpus) -> Path:
    key = {
        "format": FORMAT_VERSION,
        "corpus": corpus.identity(),
        "tokenizer": file_sha256(tokenizer.path),
        # a tokenizer.json's end-of-document id comes from tokenizer_config.json, not the hashed file
        "eos_id": tokenizer.eos_id,
        "text_field": data.text_field,
        "val_fraction": data.val_fraction,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(data.cache_dir) / f"data-{digest}"


def prepare_dataset(data: DataConfig, tokenizer, progress: bool = True) -> PreparedData:
    """The prepared train/validation datasets of `data`, building them first if not cached.

    Args:
        data: the `data` config section (source, text_field, cache_dir, val_fraction, num_workers).
        tokenizer: `longctx.tokenizer.Tokenizer` (from `load_tokenizer`).
        progress: show a progress bar while building.
    """
    prefix = megatron_prefix(data.source)
    if prefix is not None:
        return _open_megatron(prefix, data.val_fraction)
    corpus = Corpus(data.source, data.text_field, data.cache_dir)
    entry = cache_entry(data, tokenizer, corpus)
    built = not entry.is_dir()
    if built:
        build_entry(corpus, tokenizer, entry, data.val_fraction, data.num_workers, progress)
    prepared = open_entry(entry)
    prepared.built = built
    return prepared


def open_dataset(data: DataConfig, tokenizer) -> PreparedData:
    """The datasets `prepare_dataset` built for `data` (in another process: the node's writer); a
    ValueError if there are none."""
    prefix = megatron_prefix(data.source)
    if prefix is not None:
        return _open_megatron(prefix, data.val_fraction)
    entry = cache_entry(data, tokenizer, Corpus(data.source, data.text_field, data.cache_dir))
    if not entry.is_dir():
        raise ValueError(
            f"the prepared data {str(entry)!r} does not exist after the writer finished; on several nodes "
            "without a shared file system, data.cache_dir must be local and each node's rank 0 the writer"
        )
    return open_entry(entry)


def _rebuild_hint(entry: Path) -> str:
    return (
        f"delete {str(entry)!r} and rerun `longctx data prepare --config ...` (or the training run) "
        "to rebuild it"
    )


def open_entry(entry: Path) -> PreparedData:
    hint = _rebuild_hint(entry)
    meta_path = entry / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(meta_path)!r} is missing or corrupt ({e}); {hint}") from e
    splits = {}
    for split in ("train", "val"):
        docs = TokenDocuments.open(entry / split, hint)
        want = meta["splits"][split]
        if (docs.num_docs, docs.num_tokens) != (want["num_docs"], want["num_tokens"]):
            raise ValueError(
                f"{str(entry / split)!r}.bin/.idx hold {docs.num_docs} documents, {docs.num_tokens} "
                f"tokens but {str(meta_path)!r} records {want['num_docs']}, {want['num_tokens']}; {hint}"
            )
        splits[split] = docs
    return PreparedData(splits["train"], splits["val"], entry, meta)


def _open_megatron(prefix: str, val_fraction: float) -> PreparedData:
    hint = (
        "rebuild it with Megatron-LM's tools/preprocess_data.py, or point data.source at the original corpus"
    )
    docs = TokenDocuments.open(prefix, hint)
    val = is_validation(np.arange(docs.num_docs), val_fraction)
    meta = {"source": prefix, "splits": {}}
    splits = {"train": docs.subset(np.flatnonzero(~val)), "val": docs.subset(np.flatnonzero(val))}
    for name, split in splits.items():
        meta["splits"][name] = {"num_docs": split.num_docs, "num_tokens": split.num_tokens}
    return PreparedData(splits["train"], splits["val"], Path(prefix), meta)


def build_entry(
    corpus: Corpus, tokenizer, entry: Path, val_fraction: float, num_workers: int = 0, progress: bool = True
) -> dict:
    """Tokenize `corpus` into `entry/{train,val}.{bin,idx}` + `meta.json`, atomically."""
    from tqdm import tqdm

    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(entry)
    tmp = entry.with_name(f"{entry.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if tokenizer.eos_id < 0:
        raise ValueError(
            f"the tokenizer {str(tokenizer.path)!r} has no end-of-text token, which separates the documents "
            "of the prepared data; name it as eos_token in the tokenizer_config.json beside it"
        )
    threads = num_workers or len(os.sched_getaffinity(0))
    dtype = token_dtype(tokenizer.vocab_size)
    bar = None
    try:
        writers = {"train": IndexedWriter(tmp / "train", dtype), "val": IndexedWriter(tmp / "val", dtype)}
        start = time.perf_counter()
        bar = tqdm(
            total=corpus.num_documents(), desc="prepare", unit="doc", disable=not progress, dynamic_ncols=True
        )
        index = 0
        for texts in _batches(corpus.documents()):
            for ids in tokenizer.encode_batch(texts, num_threads=threads):
                ids.append(tokenizer.eos_id)
                writers["val" if is_validation(index, val_fraction) else "train"].add(np.array(ids, dtype))
                index += 1
            bar.update(len(texts))
            bar.set_postfix(tokens=f"{sum(w.num_tokens for w in writers.values()):,}", refresh=False)
        if index == 0:
            raise ValueError(f"data.source {corpus.source!r} is an empty corpus: it holds no documents")
        if all(w.num_tokens == w.num_docs for w in writers.values()):
            raise ValueError(
                f"data.source {corpus.source!r} is an empty corpus: all {index} documents are empty"
            )
        for w in writers.values():
            w.finish()
        meta = {
            "format": FORMAT_VERSION,
            "source": corpus.source,
            "corpus_identity": corpus.identity(),
            "tokenizer": str(tokenizer.path),
            "tokenizer_sha256": file_sha256(tokenizer.path),
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "dtype": np.dtype(dtype).name,
            "val_fraction": val_fraction,
            "splits": {k: {"num_docs": w.num_docs, "num_tokens": w.num_tokens} for k, w in writers.items()},
            "seconds": round(time.perf_counter() - start, 3),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, entry)
        except OSError:
            # Another process completed the same entry first; its copy is identical.
            if not entry.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return meta


def _batches(texts, max_chars: int = 4_000_000, max_docs: int = 4096):
    """Groups of documents small enough to keep memory flat and big enough to keep threads busy."""
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= max_chars or len(batch) >= max_docs:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _remove_stale_temporaries(entry: Path) -> None:
    """Delete half-written temporaries of `entry` left by processes of this host that died."""
    host = socket.gethostname()
    for tmp in entry.parent.glob(f"{entry.name}.tmp-{host}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass
