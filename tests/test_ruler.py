"""The RULER-style suite: samples are reproducible and answerable, scoring, and `longctx eval ruler`."""

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch

from longctx.data import builtin_documents
from longctx.data.indexed import TokenDocuments
from longctx.eval.ruler import (
    TASKS,
    evaluate_ruler,
    parse_tasks,
    ruler_sample,
    score,
)
from longctx.tokenizer import Tokenizer, train_tokenizer
from tests.test_eval import make_run, small_model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer(train_tokenizer(builtin_documents(), 1024, tmp_path_factory.mktemp("tok") / "t.model"))


@pytest.fixture(scope="module")
def docs(tokenizer):
    ids = [
        np.asarray(tokenizer.encode(t) + [tokenizer.eos_id], dtype=np.int64)
        for t in list(builtin_documents())[:20]
    ]
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return TokenDocuments("builtin[:20]", np.concatenate(ids), starts, lengths)


def solve(task: str, text: str) -> list[str]:
    """Answer a prompt from its text alone, as a perfect reader would (independent of the generator)."""
    if task == "passkey":
        return [re.search(r"The pass key is (\d+)\.", text).group(1)]
    if task.startswith("niah"):
        asked = re.search(r"special magic \w+ for ([\w, -]+?) mentioned in the provided text\?", text).group(
            1
        )
        keys = re.split(r", | and ", asked)
        return [
            v for key in keys for v in re.findall(rf"magic \w+ for {re.escape(key)} is: ([\w-]+)\.", text)
        ]
    if task == "vt":
        value = re.search(r"assigned the value (\d+) in the text above", text).group(1)
        chain = [re.search(rf"VAR (\w+) = {value}\.", text).group(1)]
        while found := re.search(rf"VAR (\w+) = VAR {chain[-1]}\.", text):
            chain.append(found.group(1))
        return chain
    if task == "cwe":
        body = text.split("appear most often.")[1].split(" Question:")[0]
        return [w for w, _ in Counter(re.findall(r"\d+\. ([a-z]+)", body)).most_common(5)]
    body = text.split("Coded text:")[1].split(" Question:")[0]
    return [w for w, _ in Counter(body.split()).most_common(3)]


def oracle(tokenizer, task: str, corrupt: bool = False):
    """A generate function that answers by `solve` (`corrupt`: with the last item's last character
    changed, or, for one item, the item doubled)."""

    def generate(prompts, n):
        rows = []
        for row in prompts:
            items = solve(task, tokenizer.decode(row.tolist()))
            if corrupt:
                items[-1] = items[-1][:-1] + ("0" if items[-1][-1] != "0" else "1")
            # SentencePiece adds the space before the first word; the passkey prompt ends with it.
            ids = tokenizer.encode(", ".join(items))
            if task == "passkey":
                ids = [tokenizer.digit_ids()[int(c)] for c in items[0]]
            ids = ids[:n]
            rows.append(ids + [tokenizer.eos_id] * (n - len(ids)))
        return torch.tensor(rows)

    return generate


def test_samples_are_reproducible_exact_length_and_vary(tokenizer, docs):
    for task in TASKS:
        a = ruler_sample(tokenizer, docs, task, 320, 0.5, seed=1, index=2)
        b = ruler_sample(tokenizer, docs, task, 320, 0.5, seed=1, index=2)
        assert len(a.tokens) == 320 and np.array_equal(a.tokens, b.tokens) and a.items == b.items, task
        c = ruler_sample(tokenizer, docs, task, 320, 0.5, seed=1, index=3)
        assert not np.array_equal(a.tokens, c.tokens), task
        assert score(a, a.answer) == (True, 1.0), task
    with pytest.raises(ValueError, match="more than the length"):
        ruler_sample(tokenizer, docs, "niah_multiquery", 96, 0.5, 0, 0)
    # The passkey task asks in the run's key length (data.passkey_digits).
    for digits in (3, 5):
        sample = ruler_sample(tokenizer, docs, "passkey", 320, 0.5, 1, 2, passkey_digits=digits)
        assert sample.answer == sample.items[0] and sample.answer.isdigit() and len(sample.answer) == digits
    assert parse_tasks("vt, cwe") == ["vt", "cwe"] and parse_tasks("all") == list(TASKS)
    with pytest.raises(ValueError, match="unknown RULER task"):
        parse_tasks("vt,nope")


def test_needle_depth_places_the_asked_needle(tokenizer, docs):
    for depth, where in ((0.0, slice(0, 40)), (1.0, slice(-140, None))):
        s = ruler_sample(tokenizer, docs, "niah_single_number", 512, depth, 0, 0)
        assert s.items[0] in tokenizer.decode(s.tokens[where].tolist())


def test_a_perfect_reader_scores_one_and_a_wrong_one_zero(tokenizer, docs):
    """Every task is answerable from its prompt (an independent solver gets all right); scoring
    rejects an answer with one wrong character."""
    model = small_model()
    kwargs = dict(lengths=[320], depths=[0.0, 1.0], samples=2, batch_size=2, progress=False)
    for task in TASKS:
        good = evaluate_ruler(model, tokenizer, docs, [task], generate=oracle(tokenizer, task), **kwargs)
        assert good["accuracy"][task] == [[1.0, 1.0]], (task, good["examples"])
        assert good["items"][task] == [[1.0, 1.0]]
        bad = evaluate_ruler(model, tokenizer, docs, [task], generate=oracle(tokenizer, task, True), **kwargs)
        assert bad["accuracy"][task] == [[0.0, 0.0]], (task, bad["examples"])


def test_unordered_answers_compare_as_sets(tokenizer, docs):
    s = ruler_sample(tokenizer, docs, "cwe", 256, 0.0, 0, 0)
    assert score(s, " " + ", ".join(reversed(s.items)) + ". And more")[0]
    assert not score(s, " " + ", ".join(s.items[:-1]))[0]
    m = ruler_sample(tokenizer, docs, "niah_multiquery", 256, 0.0, 0, 0)
    assert m.ordered and not score(m, " " + ", ".join(reversed(m.items)))[0]


def test_cli_eval_ruler_context_parallel_equals_one_process(tmp_path, tokenizer, capsys):
    """`longctx eval ruler` in one process, and under torchrun with parallel.cp=2: each 264-token prompt
    prefilled context-parallel (256 tokens, 4 chunks of 4 blocks of 16) with the caches gathered, the
    last 8 stepped through, decoding on every rank; the same generations and scores. The one-process
    run's files and table are checked too."""
    from longctx.cli import main
    from tests.dist_utils import run_cli

    run = make_run(tmp_path, tokenizer, small_model("DSNLG", seed=3))
    hay = tmp_path / "hay.txt"
    hay.write_text("\n".join(list(builtin_documents())[:5]))
    args = ["eval", "ruler", "--run-dir", str(run), "--lengths", "264", "--depths", "0,1", "--samples", "2"]
    args += ["--tasks", "passkey,niah_multikey", "--haystack", str(hay), "--no-progress", "--batch-size", "2"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    table = capsys.readouterr().out
    assert "RULER-style suite" in table and "niah_multikey" in table and "mean" in table
    two = run_cli([*args, "--out", str(tmp_path / "two"), "parallel.cp=2"], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    assert b["processes"] == {"dp": 1, "cp": 2}
    assert [len(a["examples"][t]) for t in ("passkey", "niah_multikey")] == [2, 2]
    assert a["examples"] == b["examples"] and a["accuracy"] == b["accuracy"] and a["items"] == b["items"]
    pngs = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert pngs == ["heatmap_niah_multikey.png", "heatmap_passkey.png", "summary.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in (tmp_path / "one").glob("*.png"))
