"""The data pipeline: corpora -> Megatron indexed datasets, the packed sampler, passkey samples,
validation loss, and the errors a user meets. Indexed datasets are read back with megatron-core's own
`IndexedDataset`, and splits/streams are recomputed here from their documented rules."""

import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from longctx.cli import main
from longctx.config import ConfigError, load_config
from longctx.data import (
    PackedSampler,
    PasskeyMixture,
    TokenDocuments,
    build_samplers,
    builtin_documents,
    load_tokenizer,
    make_passkey_sample,
    open_dataset,
    prepare_dataset,
    read_haystack,
)
from longctx.data.corpus import Corpus
from longctx.data.indexed import IndexedWriter, _megatron_indexed
from longctx.data.prepare import cache_entry
from longctx.tokenizer import Tokenizer, train_tokenizer
from longctx.train.distributed import DistInfo

VAL_FRACTION = 0.1


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "t512.model"
    return Tokenizer(train_tokenizer(builtin_documents(), 512, path))


def make_documents(n: int, seed: int = 0) -> list[str]:
    """`n` varied documents: corpus prose and code, digits, non-ASCII, leading and trailing whitespace."""
    rng = random.Random(seed)
    base = builtin_documents()
    docs = []
    for i in range(n):
        src = base[rng.randrange(len(base))]
        a = rng.randrange(max(1, len(src) - 600))
        text = f"Document {i}. " + src[a : a + rng.randrange(40, 600)]
        if i % 7 == 0:
            text = "  naïve ∑ café\n" + text + "\n\n"
        docs.append(text)
    return docs


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)))
    return path


def write_parquet(path: Path, docs: list[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), path)
    return path


def write_txt_folder(path: Path, docs: list[str]) -> Path:
    path.mkdir()
    for i, d in enumerate(docs):
        sub = path / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        with open(sub / f"doc{i:03d}.txt", "w", encoding="utf-8", newline="") as f:
            f.write(d)
    return path


def config(tmp_path: Path, source, tokenizer=None, *overrides):
    return load_config(
        None,
        [
            f"data.source={source}",
            f"data.tokenizer={tokenizer.path if tokenizer else ''}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"data.val_fraction={VAL_FRACTION}",
            "model.vocab_size=512",
            *overrides,
        ],
    )


def overrides(tmp_path: Path, tokenizer, source, *extra) -> list[str]:
    """`key=value` arguments for the CLI: this corpus, the test tokenizer, a private cache."""
    return [
        f"data.source={source}",
        f"data.tokenizer={tokenizer.path}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "model.vocab_size=512",
        *extra,
    ]


def is_val(i: int, f: float = VAL_FRACTION) -> bool:
    scale = round(f * 1_000_000)
    return (i + 1) * scale // 1_000_000 > i * scale // 1_000_000


def read_megatron(prefix) -> list[np.ndarray]:
    """Every document of a Megatron dataset through megatron-core's IndexedDataset (not our reader)."""
    ds = _megatron_indexed().IndexedDataset(str(prefix))
    bounds = ds.document_indices
    return [np.concatenate(ds[int(bounds[d]) : int(bounds[d + 1])]) for d in range(len(bounds) - 1)]


@pytest.mark.parametrize("kind", ["jsonl-200", "parquet-200", "txt-folder-50"])
def test_prepare_writes_every_document_to_megatron_datasets(kind, tmp_path, tokenizer):
    n = int(kind.rsplit("-", 1)[1])
    docs = make_documents(n)
    if kind.startswith("jsonl"):
        source = write_jsonl(tmp_path / "c.jsonl", docs)
    elif kind.startswith("parquet"):
        source = write_parquet(tmp_path / "c.parquet", docs)
    else:
        source = write_txt_folder(tmp_path / "txt", docs)
        # The folder is read in sorted path order: b/doc000, b/doc002, ..., a/doc001 sorts first.
        paths = sorted(p for p in source.rglob("*.txt"))
        docs = [p.read_bytes().decode() for p in paths]
    data = prepare_dataset(config(tmp_path, source, tokenizer).data, tokenizer, progress=False)

    train, val = read_megatron(data.path / "train"), read_megatron(data.path / "val")
    assert len(train) + len(val) == n
    assert len(val) == int(n * VAL_FRACTION)
    it_train, it_val = iter(train), iter(val)
    for i, text in enumerate(docs):
        ids = next(it_val if is_val(i) else it_train)
        assert ids[-1] == tokenizer.eos_id and tokenizer.eos_id not in ids[:-1]
        assert tokenizer.decode(ids[:-1]) == text, f"document {i}"
    assert (data.train.num_docs, data.val.num_docs) == (len(train), len(val))


def test_prepare_cli_caches_and_rebuilds_when_the_corpus_changes(tmp_path, tokenizer, capsys):
    source = write_jsonl(tmp_path / "c.jsonl", make_documents(30))
    args = ["data", "prepare", *overrides(tmp_path, tokenizer, source)]
    assert main(args) == 0
    assert "tokens/minute" in capsys.readouterr().out
    assert main(args) == 0
    assert "already prepared" in capsys.readouterr().out
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith("data-"))
    assert len(entries) == 1 and ".tmp" not in entries[0]

    write_jsonl(source, make_documents(31))
    assert main(args) == 0
    assert "tokens/minute" in capsys.readouterr().out
    assert len([p for p in (tmp_path / "cache").iterdir() if p.name.startswith("data-")]) == 2


def test_tokenizer_is_trained_on_a_file_corpus_when_none_is_given(tmp_path):
    source = write_jsonl(tmp_path / "c.jsonl", make_documents(200))
    cfg = config(tmp_path, source, None, "model.vocab_size=400")
    tok = load_tokenizer(cfg.data, cfg.model.vocab_size)
    assert tok.path.parent == tmp_path / "cache" and tok.vocab_size == 400
    assert load_tokenizer(cfg.data, cfg.model.vocab_size).path == tok.path  # cached
    assert prepare_dataset(cfg.data, tok, progress=False).train.num_docs == 180


def test_megatron_prefix_is_used_in_place(tmp_path, tokenizer):
    """A dataset written the way Megatron-LM's preprocess_data.py writes split sentences: several
    sequences per document."""
    builder = _megatron_indexed().IndexedDatasetBuilder(str(tmp_path / "mega.bin"), dtype=np.uint16)
    written = []
    for text in make_documents(40):
        halves = [tokenizer.encode(text[: len(text) // 2]), tokenizer.encode(text[len(text) // 2 :])]
        ids = halves[0] + halves[1] + [tokenizer.eos_id]
        builder.add_document(np.array(ids), [len(halves[0]), len(ids) - len(halves[0])])
        written.append(ids)
    builder.finalize(str(tmp_path / "mega.idx"))

    with pytest.raises(ValueError, match="set data.tokenizer"):
        load_tokenizer(config(tmp_path, tmp_path / "mega.bin", None).data, 1024)
    cfg = config(tmp_path, tmp_path / "mega", tokenizer)
    data = prepare_dataset(cfg.data, load_tokenizer(cfg.data, cfg.model.vocab_size), progress=False)
    assert (data.train.num_docs, data.val.num_docs) == (36, 4)
    splits = {True: iter(range(data.val.num_docs)), False: iter(range(data.train.num_docs))}
    for i, ids in enumerate(written):
        docs = data.val if is_val(i) else data.train
        assert docs.document(next(splits[is_val(i)])).tolist() == ids
    assert no_entries(tmp_path / "cache")
    train = cfg.train
    batch = build_samplers(
        cfg.data,
        data,
        tokenizer,
        batch_size=train.batch_size,
        seed=train.seed,
        vocab_size=cfg.model.vocab_size,
    )[0].next_batch()
    assert batch.tokens.shape == (cfg.train.batch_size, cfg.data.seq_len + 1)


def test_only_the_writer_prepares_and_the_others_wait(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "c.jsonl", make_documents(50))
    cfg = config(tmp_path, source, tokenizer)
    barrier = threading.Barrier(2)
    results = {}

    def rank(r):
        info = SimpleNamespace(local_rank=r, barrier=barrier.wait)
        results[r] = DistInfo.writer_first(
            info,
            lambda: prepare_dataset(cfg.data, tokenizer, progress=False),
            lambda: open_dataset(cfg.data, tokenizer),
        )

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0].built and not results[1].built and results[0].path == results[1].path
    assert np.array_equal(results[0].train.tokens, results[1].train.tokens)

    lonely = config(tmp_path / "other", source, tokenizer)
    with pytest.raises(ValueError, match="does not exist after the writer finished"):
        open_dataset(lonely.data, tokenizer)


def test_interrupted_prepare_leaves_nothing_that_looks_complete(tmp_path, tokenizer, monkeypatch):
    source = write_jsonl(tmp_path / "c.jsonl", make_documents(50))
    cfg = config(tmp_path, source, tokenizer)
    add = IndexedWriter.add

    def add_then_die(self, ids):
        if self.num_docs == 20:
            raise KeyboardInterrupt
        add(self, ids)

    monkeypatch.setattr(IndexedWriter, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(cfg.data, tokenizer, progress=False)
    assert not [p.name for p in (tmp_path / "cache").iterdir() if p.name != "hf"]  # hf: datasets' cache
    monkeypatch.setattr(IndexedWriter, "add", add)

    # A process killed outright leaves its temporary behind: never read, removed by the next build.
    entry = cache_entry(cfg.data, tokenizer, Corpus(str(source), "text", tmp_path / "cache"))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = entry.with_name(f"{entry.name}.tmp-{socket.gethostname()}-{int(dead.stdout)}")
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"half")
    data = prepare_dataset(cfg.data, tokenizer, progress=False)
    assert data.path == entry and data.train.num_docs + data.val.num_docs == 50
    assert not stale.exists()


# ---- errors -------------------------------------------------------------------------------------


def run_cli(capsys, *args) -> str:
    code = main(list(args))
    err = capsys.readouterr().err
    # The message is the last line (a progress bar may come before it).
    last = err.strip().splitlines()[-1]
    assert code != 0 and last.startswith("longctx: error: "), err
    assert "Traceback" not in err
    return last


def no_entries(cache: Path) -> bool:
    return not cache.exists() or not [p for p in cache.iterdir() if p.name.startswith("data-")]


def test_jsonl_line_without_text_names_file_line_and_field(tmp_path, tokenizer, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "first document"}\n{"title": "no text here"}\n{"text": "third"}\n')
    err = run_cli(capsys, "data", "prepare", *overrides(tmp_path, tokenizer, path))
    assert str(path) in err and "line 2" in err and "'text'" in err
    assert no_entries(tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.tmp*"))


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"text": "a"}\n\n{"text": 5}\n', r"line 3 field 'text' is not a string"),
        ('{"text": "a"}\n{"text": \n', r"line 2"),
        ('{"body": "a"}\n', r"line 1 has no field 'text' \(fields: body\)"),
    ],
    ids=["number", "broken-json", "no-field-anywhere"],
)
def test_bad_json_records_are_located(content, message, tmp_path, tokenizer, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    err = run_cli(capsys, "data", "prepare", *overrides(tmp_path, tokenizer, path))
    assert str(path) in err
    assert re.search(message, err), err


def test_missing_source_and_empty_corpora(tmp_path, tokenizer, capsys):
    def prepare_error(source) -> str:
        return run_cli(capsys, "data", "prepare", *overrides(tmp_path, tokenizer, tmp_path / source))

    err = prepare_error("nope.jsonl")
    assert "not found" in err and "nope.jsonl" in err
    (tmp_path / "empty").mkdir()
    assert "empty corpus" in prepare_error("empty")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    assert "empty corpus" in prepare_error("blank.jsonl")
    write_jsonl(tmp_path / "empties.jsonl", ["", ""])
    assert "all 2 documents are empty" in prepare_error("empties.jsonl")
    (tmp_path / "mixed").mkdir()
    write_jsonl(tmp_path / "mixed" / "a.jsonl", ["x"])
    (tmp_path / "mixed" / "notes.md").write_text("y")
    assert "notes.md" in prepare_error("mixed")
    assert no_entries(tmp_path / "cache")


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7] if how == "truncate" else data + b"\0\0")


@pytest.mark.parametrize(
    "target,how,message",
    [
        ("train.bin", "truncate", r"train\.bin' is truncated"),
        ("val.bin", "extend", r"val\.bin' is longer than its index says"),
        ("train.idx", "truncate", r"the index .*train\.idx' is truncated"),
        ("swap", None, r"hold .* documents"),
        ("swap-idx", None, r"train\.bin' is longer than its index says"),
        ("meta.json", "delete", r"meta\.json' is missing or corrupt"),
    ],
    ids=["bin-truncated", "bin-extended", "idx-truncated", "split-swapped", "idx-swapped", "meta-missing"],
)
def test_damaged_prepared_data_is_an_error_that_says_how_to_rebuild(
    target, how, message, tmp_path, tokenizer, capsys
):
    source = write_jsonl(tmp_path / "c.jsonl", make_documents(40))
    args = ["data", "prepare", *overrides(tmp_path, tokenizer, source)]
    assert main(args) == 0
    (entry,) = (tmp_path / "cache").glob("data-*")
    if target.startswith("swap"):
        for suffix in (".bin", ".idx") if target == "swap" else (".idx",):
            a, b = entry / f"train{suffix}", entry / f"val{suffix}"
            tmp = entry / "x"
            a.rename(tmp), b.rename(a), tmp.rename(b)
    elif how == "delete":
        (entry / target).unlink()
    else:
        corrupt(entry / target, how)
    err = run_cli(capsys, *args)
    assert re.search(message, err), err
    assert f"delete '{entry}'" in err and "longctx data prepare" in err


def test_hub_source_offline_is_a_clear_error(tmp_path, tokenizer, monkeypatch):
    # Offline mode as a user sets it; a fresh interpreter, since `datasets` reads it at import.
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "longctx", "data", "prepare"]
    command += overrides(tmp_path, tokenizer, "hf:someone/corpus:train")
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "longctx: error: cannot reach the Hugging Face Hub for dataset 'someone/corpus'" in proc.stderr
    assert "HF_HUB_OFFLINE" in proc.stderr

    # No network (the host name does not resolve): the same error at once, not after retries.
    def no_dns(*args, **kwargs):
        raise OSError("Name or service not known")

    for var in (
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "HF_HUB_OFFLINE",
        "HF_DATASETS_OFFLINE",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("socket.getaddrinfo", no_dns)
    cfg = config(tmp_path, "hf:someone/corpus", tokenizer)
    with pytest.raises(ValueError, match="cannot resolve huggingface.co.*looks offline"):
        prepare_dataset(cfg.data, tokenizer, progress=False)
    with pytest.raises(ValueError, match="hf:NAME, hf:NAME:SPLIT"):
        prepare_dataset(config(tmp_path, "hf:a:b:c:d", tokenizer).data, tokenizer, progress=False)


# ---- sampler ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("prepared")
    source = write_jsonl(tmp / "c.jsonl", make_documents(120, seed=1))
    return prepare_dataset(config(tmp, source, tokenizer).data, tokenizer, progress=False)


def sampler(prepared, tokenizer, dp_rank=0, dp_size=1, passkey=0.0, seq_len=128, batch_size=3, seed=7):
    mix = PasskeyMixture(passkey, tokenizer, 5) if passkey else None
    return PackedSampler(
        prepared.train, seq_len, batch_size, seed, dp_rank, dp_size, passkey=mix, vocab_size=512
    )


def batches(s: PackedSampler, n: int):
    return [s.next_batch() for _ in range(n)]


def same(a, b) -> bool:
    return all(
        torch.equal(getattr(x, f), getattr(y, f))
        for x, y in zip(a, b, strict=True)
        for f in ("tokens", "doc_starts", "answer_mask", "sample_ids")
    )


@pytest.mark.parametrize("dp_size", [1, 2], ids=["dp1", "dp2"])
@pytest.mark.parametrize("passkey", [0.0, 0.25], ids=["corpus", "passkey25"])
def test_sampler_resume_sees_exactly_the_uninterrupted_batches(prepared, tokenizer, dp_size, passkey):
    for rank in range(dp_size):
        whole = batches(sampler(prepared, tokenizer, rank, dp_size, passkey), 20)
        first = sampler(prepared, tokenizer, rank, dp_size, passkey)
        head = batches(first, 10)
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
        resumed = sampler(prepared, tokenizer, rank, dp_size, passkey)
        resumed.load_state_dict(state)
        assert same(head + batches(resumed, 10), whole)
        # The assertion can fail: a sampler with another seed gives other batches.
        assert not same(batches(sampler(prepared, tokenizer, rank, dp_size, passkey, seed=8), 20), whole)


def test_sampler_ranks_partition_the_single_rank_order(prepared, tokenizer):
    one = batches(sampler(prepared, tokenizer, batch_size=4), 10)
    r0 = batches(sampler(prepared, tokenizer, 0, 2, batch_size=2), 10)
    r1 = batches(sampler(prepared, tokenizer, 1, 2, batch_size=2), 10)
    for b, x, y in zip(one, r0, r1):
        assert torch.equal(b.tokens, torch.cat([x.tokens, y.tokens]))
        assert not set(x.sample_ids.tolist()) & set(y.sample_ids.tolist())


def test_sampler_epoch_holds_every_token_once_in_the_expected_samples(prepared, tokenizer):
    s = sampler(prepared, tokenizer, batch_size=5, seq_len=48)
    docs = prepared.train
    epoch_tokens = docs.num_tokens
    # Samples cover the stream from k * seq_len, so ceil(T / seq_len) samples hold epoch 0; they lie in
    # the first two blocks of samples_per_epoch samples, visited in shuffled order.
    needed = -(-epoch_tokens // s.seq_len)
    seen = {}
    for _ in range(-(-2 * s.samples_per_epoch // s.batch_size)):
        batch = s.next_batch()
        for q, row in zip(batch.sample_ids.tolist(), batch.tokens):
            seen[s.corpus_index(q)] = row.numpy()
    assert len(seen) == -(-2 * s.samples_per_epoch // s.batch_size) * s.batch_size  # no sample twice
    assert set(range(needed)) <= set(seen)
    # The stream as the documented rule builds it: every document once, in a seeded order.
    order = np.random.default_rng([7, 0, 0]).permutation(docs.num_docs)
    assert sorted(order.tolist()) == list(range(docs.num_docs))
    stream = np.concatenate([docs.document(int(d)) for d in order])
    assert len(stream) == epoch_tokens
    for k in range(needed):
        want = stream[k * s.seq_len : k * s.seq_len + s.seq_len + 1]
        assert np.array_equal(seen[k][: len(want)], want), f"sample {k}"
    # Every token of the epoch is a target exactly once: the samples' targets tile the stream.
    targets = np.concatenate([seen[k][1:] for k in range(needed)])[: epoch_tokens - 1]
    assert np.array_equal(targets, stream[1:])


def test_doc_starts_mark_the_first_token_of_each_document(prepared, tokenizer):
    eos = tokenizer.eos_id
    for batch in batches(sampler(prepared, tokenizer), 10):
        after_eos = torch.zeros_like(batch.doc_starts)
        after_eos[:, 1:] = batch.tokens[:, :-1] == eos
        assert torch.equal(batch.doc_starts[:, 1:], after_eos[:, 1:])
        assert batch.tokens.dtype == torch.int64 and batch.tokens.shape == (3, 129)


def test_sampler_state_from_another_setup_is_refused(prepared, tokenizer):
    state = sampler(prepared, tokenizer).state_dict()
    with pytest.raises(ValueError, match="seq_len=128.*seq_len=32"):
        sampler(prepared, tokenizer, seq_len=32).load_state_dict(state)


def test_sampler_refuses_tokens_outside_the_vocabulary(prepared, tokenizer):
    s = PackedSampler(prepared.train, 64, 2, 0, vocab_size=100)
    with pytest.raises(ValueError, match="holds token id .* model.vocab_size is 100"):
        s.next_batch()


# ---- passkey ------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_passkey_sample_format(prepared, tokenizer, depth):
    hay = read_haystack(prepared.train, 300, np.random.default_rng(0), drop_ids=[tokenizer.eos_id])
    assert len(hay) == 300 and tokenizer.eos_id not in hay
    s = make_passkey_sample(tokenizer, hay, 300, depth, np.random.default_rng(3), n_digits=5)
    again = make_passkey_sample(tokenizer, hay, 300, depth, np.random.default_rng(3), n_digits=5)
    assert np.array_equal(s.tokens, again.tokens) and s.key == again.key
    assert s.tokens.shape == (300,) and len(s.key) == 5 and s.answer_start == 295
    assert tokenizer.decode(s.tokens[s.answer_start :]) == s.key
    text = tokenizer.decode(s.tokens)
    assert text.endswith(f"What is the pass key? The pass key is {s.key}")
    assert f"The pass key is {s.key}. Remember it. {s.key} is the pass key." in text
    n_hay = (
        300
        - len(tokenizer.encode(f"The pass key is {s.key}. Remember it. {s.key} is the pass key."))
        - len(tokenizer.encode(f"What is the pass key? The pass key is {s.key}"))
    )
    assert s.needle_start == round(depth * n_hay)
    assert np.array_equal(s.tokens[: s.needle_start], hay[: s.needle_start])


def test_passkey_errors(prepared, tokenizer):
    hay = np.zeros(100, dtype=np.int64)
    with pytest.raises(ValueError, match="needs at least .* tokens .* length is 20"):
        make_passkey_sample(tokenizer, hay, 20, 0.5, np.random.default_rng(0))

    class MergedDigits:
        path = "merged.model"

        def encode(self, text):
            return tokenizer.encode(text)[:-1] + [tokenizer.encode("x")[-1]]

        def digit_ids(self):
            return tokenizer.digit_ids()

    # A tokenizer that merges the key's digits gets them spelled one digit token a position.
    s = make_passkey_sample(MergedDigits(), hay, 80, 0.5, np.random.default_rng(0))
    assert s.tokens[s.answer_start :].tolist() == [tokenizer.digit_ids()[int(c)] for c in s.key]
    with pytest.raises(ValueError, match="needs at least"):
        sampler(prepared, tokenizer, passkey=0.5, seq_len=16)


def test_passkey_mixture_adds_samples_without_dropping_corpus_ones(prepared, tokenizer):
    plain = batches(sampler(prepared, tokenizer, batch_size=4), 15)
    mixed = batches(sampler(prepared, tokenizer, passkey=0.25, batch_size=4), 20)
    rows = [r for b in mixed for r in zip(b.tokens, b.answer_mask)]
    passkey_rows = [(t, m) for t, m in rows if m.any()]
    assert len(passkey_rows) == 20  # exactly a quarter of 80
    for tokens, mask in passkey_rows:
        assert mask.sum() == 5 and mask[-5:].all()
        assert all(int(t) in tokenizer.digit_ids() for t in tokens[mask])
    corpus_rows = [t for t, m in rows if not m.any()]
    assert torch.equal(torch.stack(corpus_rows), torch.cat([b.tokens for b in plain]))


# ---- validation loss in training -----------------------------------------------------------------


def test_training_logs_validation_loss(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "c.jsonl", make_documents(60))
    run = tmp_path / "run"
    small = ["data.seq_len=128", "model.layers=D", "model.dim=32", "model.n_layers=1", "train.steps=4"]
    run_args = [f"train.run_dir={run}", "train.wandb=false", "train.progress=false"]
    evals = ["train.eval_every=2", "train.eval_batches=2", "data.passkey_fraction=0.5"]
    args = overrides(tmp_path, tokenizer, source, *small, *evals, *run_args)
    code = main(["train", "--config", "configs/tiny.yaml", *args])
    assert code == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    val = [r.get("val_loss") for r in records]
    assert val[0] is None and val[2] is None
    assert all(isinstance(v, float) and 0 < v < 10 for v in (val[1], val[3]))


def test_validation_needs_a_validation_split(tmp_path, tokenizer, capsys):
    source = write_jsonl(tmp_path / "c.jsonl", make_documents(5))
    extra = [
        "data.val_fraction=0.1",
        "train.eval_every=1",
        f"train.run_dir={tmp_path / 'run'}",
        "train.wandb=false",
    ]
    err = run_cli(capsys, "train", *overrides(tmp_path, tokenizer, source, *extra))
    assert "validation split" in err and "data.val_fraction" in err


@pytest.mark.parametrize(
    "override,message",
    [("data.passkey_digits=0", "data.passkey_digits"), ("data.num_workers=-1", "data.num_workers")],
)
def test_data_config_validation(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_token_documents_read_crosses_documents(prepared):
    docs: TokenDocuments = prepared.train
    a = int(docs.lengths[0])
    tokens, starts = docs.read(a - 3, 10)
    assert np.array_equal(tokens, np.concatenate([docs.document(0), docs.document(1)])[a - 3 : a + 7])
    assert starts.tolist() == [False] * 3 + [True] + [False] * 6
