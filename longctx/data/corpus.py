"""Where documents come from: `data.source` resolved to a `Corpus` that yields one string per document.

    corpus = open_corpus("data/my_corpus", text_field="text", cache_dir=".cache/longctx")
    for text in corpus.documents(): ...

Sources:
- `builtin`: the English text that ships inside CPython (`pydoc_data.topics`: the language
  reference's topic pages), so a fresh machine trains without a download.
- a local file, or a folder searched recursively: `.txt` (one document per file, read verbatim),
  `.jsonl` / `.json` (one document per record, the string field `text_field`) and `.parquet` (one
  per row, column `text_field`). JSON and Parquet are loaded through `datasets`, which keeps an Arrow
  copy under `cache_dir/hf` so the second pass (tokenizer training, then tokenization) is fast.
- `hf:NAME`, `hf:NAME:SPLIT` or `hf:NAME:CONFIG:SPLIT`: a Hugging Face Hub dataset, streamed.
- a Megatron indexed dataset prefix (`PREFIX.bin` + `PREFIX.idx`): already tokenized, used as it is;
  `megatron_prefix` recognises it and `longctx.data.prepare` opens it.

A corpus's `identity()` is a digest of what its documents are made of (file paths, sizes and
modification times; the dataset name), which keys the tokenizer and prepared-data caches.
"""

import hashlib
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

TEXT_SUFFIXES = (".txt",)
TABLE_SUFFIXES = (".jsonl", ".json", ".parquet")
SUPPORTED = TEXT_SUFFIXES + TABLE_SUFFIXES


def builtin_documents() -> list[str]:
    """The built-in corpus: one document per topic page, in a fixed order."""
    from pydoc_data import topics

    return [topics.topics[name] for name in sorted(topics.topics)]


def megatron_prefix(source: str) -> str | None:
    """The prefix of the Megatron indexed dataset `source` names (`PREFIX`, `PREFIX.bin` or
    `PREFIX.idx`), or None when `source` is not one."""
    prefix = source[:-4] if source.endswith((".bin", ".idx")) else source
    if Path(prefix + ".bin").is_file() or Path(prefix + ".idx").is_file():
        return prefix
    return None


def iter_documents(source: str, text_field: str = "text", cache_dir: str | Path = ".cache/longctx"):
    """Every document of `source` (see `Corpus`)."""
    return Corpus(source, text_field, cache_dir).documents()


class Corpus:
    """The documents of one `data.source` (anything but a Megatron prefix)."""

    def __init__(self, source: str, text_field: str = "text", cache_dir: str | Path = ".cache/longctx"):
        self.source = source
        self.text_field = text_field
        self.hf_cache = str(Path(cache_dir) / "hf")
        self.files: list[Path] = []
        self.hub: tuple[str, str | None, str] | None = None
        self._tables: dict[Path, object] = {}
        if source == "builtin":
            return
        if source.startswith("hf:"):
            self.hub = _parse_hub_source(source)
            return
        self.files = _list_files(source)

    def identity(self) -> str:
        """A digest that changes whenever the documents may have changed."""
        h = hashlib.sha256(f"corpus-v1|{self.source}|{self.text_field}".encode())
        if self.source == "builtin":
            h.update(sys.version.encode())
            for text in builtin_documents():
                h.update(text.encode())
        for path in self.files:
            st = path.stat()
            h.update(f"|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def num_documents(self) -> int | None:
        """How many documents `documents()` yields, when known without reading them (None: streamed)."""
        if self.source == "builtin":
            return len(builtin_documents())
        if self.hub is not None:
            return None
        return sum(1 if p.suffix in TEXT_SUFFIXES else _num_rows(self._table(p)) for p in self.files)

    def documents(self, max_chars: int | None = None) -> Iterator[str]:
        """Every document in a fixed order (stopping once `max_chars` characters were yielded)."""
        total = 0
        for text in self._all_documents():
            yield text
            total += len(text)
            if max_chars is not None and total >= max_chars:
                return

    def _all_documents(self) -> Iterator[str]:
        if self.source == "builtin":
            yield from builtin_documents()
        elif self.hub is not None:
            yield from self._hub_documents()
        for path in self.files:
            if path.suffix in TEXT_SUFFIXES:
                yield _read_text_file(path)
            else:
                yield from self._table_documents(path)

    def _table(self, path: Path):
        if path not in self._tables:
            import datasets

            datasets.disable_progress_bars()
            datasets.logging.set_verbosity_error()
            builder = "parquet" if path.suffix == ".parquet" else "json"
            try:
                table = datasets.load_dataset(
                    builder, data_files=str(path), split="train", cache_dir=self.hf_cache
                )
            except Exception as e:
                if _is_blank(path):
                    # `datasets` cannot load a file without records; it simply holds no documents.
                    self._tables[path] = None
                    return None
                problem = _first_bad_json_line(path, self.text_field) if path.suffix == ".jsonl" else ""
                if problem:
                    raise ValueError(f"{str(path)!r} {problem}") from e
                raise ValueError(f"cannot read {str(path)!r}: {e.__cause__ or e}") from e
            self._tables[path] = table
        return self._tables[path]

    def _table_documents(self, path: Path) -> Iterator[str]:
        table = self._table(path)
        if table is None:
            return
        field = self.text_field
        if field not in table.column_names:
            raise ValueError(
                f"{_record_name(path, 0)} has no field {field!r} (fields: {', '.join(table.column_names)}); "
                f"set data.text_field to the field that holds the text"
            )
        row = 0
        for batch in table.select_columns([field]).iter(batch_size=1024):
            for text in batch[field]:
                if not isinstance(text, str):
                    raise ValueError(_missing_field_message(path, row, field, text))
                yield text
                row += 1

    def _hub_documents(self) -> Iterator[str]:
        import datasets

        name, config, split = self.hub
        datasets.disable_progress_bars()
        offline = _hub_offline()
        if not offline:
            _check_hub_reachable(name)
        try:
            # Streaming reads the dataset as it goes; offline, only a copy in the local HF cache can be used.
            rows = datasets.load_dataset(
                name, config, split=split, streaming=not offline, cache_dir=self.hf_cache
            )
        except ConnectionError as e:
            raise ValueError(_offline_message(name, str(e))) from e
        except Exception as e:
            raise ValueError(f"cannot load Hugging Face dataset {name!r} (split {split!r}): {e}") from e
        for row, record in enumerate(_reraise_connection_errors(rows, name)):
            text = record.get(self.text_field)
            if not isinstance(text, str):
                raise ValueError(
                    f"record {row + 1} of Hugging Face dataset {name!r} has no string field "
                    f"{self.text_field!r} (fields: {', '.join(record)}); set data.text_field"
                )
            yield text


def _reraise_connection_errors(rows, name: str) -> Iterator[dict]:
    try:
        yield from rows
    except (ConnectionError, TimeoutError) as e:
        raise ValueError(f"lost the connection while streaming Hugging Face dataset {name!r}: {e}") from e


def _num_rows(table) -> int:
    return 0 if table is None else table.num_rows


def _is_blank(path: Path) -> bool:
    with open(path, "rb") as f:
        return all(not chunk.strip() for chunk in iter(lambda: f.read(1 << 20), b""))


def _parse_hub_source(source: str) -> tuple[str, str | None, str]:
    parts = source[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise ValueError(
            f"data.source {source!r} is not of the form hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT "
            "(e.g. hf:roneneldan/TinyStories:train)"
        )
    name = parts[0]
    config = parts[1] if len(parts) == 3 else None
    split = parts[-1] if len(parts) > 1 else "train"
    return name, config, split


def _list_files(source: str) -> list[Path]:
    root = Path(source)
    if not root.exists():
        raise FileNotFoundError(
            f"data.source {source!r} not found: expected builtin, a file or folder of .txt, .jsonl, "
            ".json or .parquet files, hf:NAME[:SPLIT], or a Megatron dataset prefix (PREFIX.bin + PREFIX.idx)"
        )
    if root.is_file():
        if root.suffix not in SUPPORTED:
            raise ValueError(
                f"data.source {source!r}: {root.suffix or 'no'} suffix is not a corpus format; "
                f"use one of {', '.join(SUPPORTED)}"
            )
        return [root]
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    unsupported = [p for p in files if p.suffix not in SUPPORTED]
    if unsupported:
        shown = ", ".join(str(p) for p in unsupported[:3]) + (" ..." if len(unsupported) > 3 else "")
        raise ValueError(
            f"data.source {source!r} holds {len(unsupported)} file(s) that are not a corpus format "
            f"({shown}); every file must be one of {', '.join(SUPPORTED)}, so none is skipped silently. "
            "Move the others out or point data.source at a folder of corpus files only"
        )
    if not files:
        raise ValueError(
            f"data.source {source!r} is an empty corpus: the folder holds no {', '.join(SUPPORTED)} files"
        )
    return files


def _read_text_file(path: Path) -> str:
    try:
        # newline="" keeps the text byte-for-byte (no \r\n translation).
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(path)!r} is not UTF-8 text ({e}); convert it to UTF-8") from e


def _record_name(path: Path, row: int) -> str:
    """Where record `row` (0-based, blank lines not counted) of `path` lives, as a person would look."""
    if path.suffix == ".jsonl":
        line = _jsonl_line_of_record(path, row)
        return f"{str(path)!r} line {line}"
    kind = "row" if path.suffix == ".parquet" else "record"
    return f"{str(path)!r} {kind} {row + 1}"


def _jsonl_line_of_record(path: Path, row: int) -> int:
    seen = -1
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                seen += 1
                if seen == row:
                    return number
    return number


def _missing_field_message(path: Path, row: int, field: str, value) -> str:
    what = f"has no field {field!r}" if value is None else f"field {field!r} is not a string ({value!r})"
    return f"{_record_name(path, row)} {what}; every record needs a string {field!r} (data.text_field)"


def _first_bad_json_line(path: Path, field: str) -> str:
    """What is wrong with the first bad line of a JSON-lines file ('' if none is found), for errors
    `datasets` reports without a line number."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {number} is not valid JSON ({e})"
            value = record.get(field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                what = (
                    f"has no field {field!r}"
                    if value is None
                    else f"field {field!r} is not a string ({value!r})"
                )
                return f"line {number} {what}; every record needs a string {field!r} (data.text_field)"
    return ""


def _hub_offline() -> bool:
    import datasets

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("HF_DATASETS_OFFLINE", ""))
    return datasets.config.HF_HUB_OFFLINE or any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _check_hub_reachable(name: str) -> None:
    """Fail fast (instead of half a minute of retries) when the Hub's host name does not resolve."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        raise ValueError(_offline_message(name, f"cannot resolve {host}: {e}")) from e


def _offline_message(name: str, detail: str) -> str:
    return (
        f"cannot reach the Hugging Face Hub for dataset {name!r} ({detail}): this machine looks offline. "
        "Download the dataset on a machine with access and point data.source at the local .jsonl/.parquet "
        "files, or, if it is already in the local Hugging Face cache, set HF_HUB_OFFLINE=1"
    )
