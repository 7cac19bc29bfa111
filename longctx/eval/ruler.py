"""A RULER-style long-context suite: retrieval with several needles and distractors, multi-hop tracing and
aggregation, scored by exact match of greedily generated answers.

    results = evaluate_ruler(model, tok, docs, tasks=["niah_multikey", "vt"], lengths=[256, 512],
                             depths=[0, 0.5, 1], samples=8)
    write_ruler(results, "runs/x/ruler")   # results.json, heatmap_<task>.png, summary.png
    print(ruler_table(results))

Every sample is a pure function of (task, seed, length, depth, index) and the corpus: the haystack is
corpus text (`read_haystack`), keys and words are drawn from the corpus's own words. A prompt is exactly
`length` tokens; the model then generates as many tokens as the reference answer has and a few more
(greedy), and the first items of the decoded text (words, numbers,
UUIDs) must be the answer's: in order, or as a set where order is free. `items` also reports the
fraction of reference items found in the generated text (RULER's partial score).

Tasks (after RULER, Hsieh et al. 2024):
- `passkey`: the training passkey format (`longctx.data.passkey`), a number at `depth`.
- `niah_single_number`, `niah_single_word`, `niah_single_uuid`: one needle "One of the special magic
  {kind} for {key} is: {value}." at `depth`, its value asked for.
- `niah_multikey`: the needle at `depth` among `NUM_DISTRACTORS` needles of other keys (distractors at
  random depths); the target key's value is asked for.
- `niah_multivalue`: one key with `NUM_VALUES` values (the first at `depth`, the rest at random depths);
  all of them must be returned.
- `niah_multiquery`: `NUM_QUERIES` keys (the first at `depth`), their values asked for in order.
- `vt`: variable tracking: `VAR A = 12345`, then `VAR B = VAR A`, ... a chain of `VT_HOPS` assignments
  starting at `depth`, plus a distractor chain; every variable holding the value must be named.
- `cwe`: common words: a numbered list of corpus words in which `CWE_WORDS` words repeat most; name
  them. `fwe`: frequent words: a "coded text" of words with Zipf frequencies; name the three most
  frequent. Depth does not apply to these two (it only enters their seed).
"""

import functools
import json
import re
import string
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from longctx.data.passkey import make_passkey_sample, read_haystack

NUM_DISTRACTORS, NUM_VALUES, NUM_QUERIES, VT_HOPS, CWE_WORDS, FWE_WORDS = 3, 4, 4, 4, 5, 3
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
VALUE_KINDS = {"number": "numbers", "word": "words", "uuid": "uuids"}


@dataclass
class RulerSample:
    task: str
    tokens: np.ndarray  # [length] int64 prompt
    answer_tokens: list[int]  # the reference answer as the prompt's continuation
    answer: str  # its decoded text
    items: list[str]  # the answer's items
    ordered: bool  # whether the items' order counts


@functools.lru_cache(maxsize=4)
def _word_pool_cached(tokenizer, docs_key, docs) -> tuple[str, ...]:
    n = min(docs.num_tokens, 200_000)
    ids, _ = docs.read(0, n)
    drop = {i for i in (tokenizer.eos_id, tokenizer.bos_id) if i >= 0}
    text = tokenizer.decode([int(i) for i in ids if int(i) not in drop])
    words = sorted(set(re.findall(r"\b[a-z]{3,10}\b", text)))
    if len(words) < 50:
        raise ValueError(
            f"the corpus {docs.prefix!r} holds only {len(words)} distinct lowercase words; the RULER tasks "
            "need at least 50 to draw keys and word lists from: use a larger corpus"
        )
    return tuple(words)


def word_pool(tokenizer, docs) -> tuple[str, ...]:
    """The distinct lowercase words (3-10 letters) of the corpus's first 200k tokens, sorted."""
    return _word_pool_cached(tokenizer, (docs.prefix, docs.num_tokens), docs)


def _drop_ids(tokenizer) -> list[int]:
    return [i for i in (tokenizer.eos_id, tokenizer.bos_id) if i >= 0]


def _split_answer(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Question tokens and answer tokens such that question + answer is how the text reads in one piece
    (so the answer is tokenized as a continuation, like training text)."""
    q = tokenizer.encode(question)
    joint = tokenizer.encode(question + answer)
    if joint[: len(q)] == q and len(joint) > len(q):
        return q, joint[len(q) :]
    return q, tokenizer.encode(answer)


def _place(tokenizer, docs, rng, length: int, needles: list[tuple[float, list[int]]], tail: list[int]):
    """`length` tokens: haystack with each needle at its depth (fraction of the haystack before it),
    then `tail` (the question)."""
    n_hay = length - sum(len(n) for _, n in needles) - len(tail)
    if n_hay < 0:
        raise ValueError(
            f"the needles and question take {length - n_hay} tokens, more than the length {length}; "
            "evaluate longer lengths"
        )
    hay = read_haystack(docs, n_hay, rng, drop_ids=_drop_ids(tokenizer))
    pieces, last = [], 0
    for depth, needle in sorted(needles, key=lambda x: x[0]):
        cut = int(round(depth * n_hay))
        pieces += [hay[last:cut], np.asarray(needle, dtype=np.int64)]
        last = cut
    pieces += [hay[last:], np.asarray(tail, dtype=np.int64)]
    return np.concatenate(pieces).astype(np.int64)


def _value(kind: str, rng, pool) -> str:
    if kind == "number":
        return str(int(rng.integers(1_000_000, 10_000_000)))
    if kind == "word":
        return str(rng.choice(pool))
    hexdigits = rng.choice(list("0123456789abcdef"), size=32)
    h = "".join(hexdigits)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _keys(rng, pool, n: int) -> list[str]:
    words = rng.choice(len(pool), size=2 * n, replace=False)
    return [f"{pool[words[2 * i]]}-{pool[words[2 * i + 1]]}" for i in range(n)]


def _niah(kind, n_keys, n_values, n_queries):
    """A needle task: `n_keys` keys (the first `n_queries` asked), each with `n_values` values."""

    def make(tokenizer, docs, pool, length, depth, rng):
        plural = VALUE_KINDS[kind]
        keys = _keys(rng, pool, n_keys)
        values = [[_value(kind, rng, pool) for _ in range(n_values)] for _ in keys]
        needles = []
        for i, (key, vals) in enumerate(zip(keys, values)):
            for j, val in enumerate(vals):
                # The first asked needle sits at the depth; the others anywhere.
                at = depth if (i == 0 and j == 0) else float(rng.random())
                needles.append((at, tokenizer.encode(" " + NEEDLE.format(kind=plural, key=key, value=val))))
        asked = keys[:n_queries]
        if n_queries == 1 and n_values == 1:
            question = (
                f" What is the special magic {plural[:-1]} for {asked[0]} mentioned in the provided text? "
                f"The special magic {plural[:-1]} for {asked[0]} mentioned in the provided text is"
            )
            items = [values[0][0]]
        else:
            names = asked[0] if n_queries == 1 else ", ".join(asked[:-1]) + " and " + asked[-1]
            question = (
                f" What are all the special magic {plural} for {names} mentioned in the provided text? "
                f"The special magic {plural} for {names} mentioned in the provided text are"
            )
            items = [v for vals in values[:n_queries] for v in vals]
        q, answer = _split_answer(tokenizer, question, " " + ", ".join(items))
        # Several values of one key come back in any order; several keys' values in the asked order.
        return _place(tokenizer, docs, rng, length, needles, q), answer, items, n_values == 1

    return make


def _variable_tracking(tokenizer, docs, pool, length, depth, rng):
    letters = np.array(list(string.ascii_uppercase))
    names = ["".join(rng.choice(letters, size=5)) for _ in range(2 * VT_HOPS)]
    chains = [names[:VT_HOPS], names[VT_HOPS:]]
    values = rng.choice(np.arange(10_000, 100_000), size=2, replace=False)
    needles = []
    for c, (chain, value) in enumerate(zip(chains, values)):
        start = depth if c == 0 else float(rng.random())
        # Each hop after the one before it, between it and the end.
        depths = np.sort(start + (1 - start) * rng.random(len(chain) - 1))
        statements = [f" VAR {chain[0]} = {value}."]
        statements += [f" VAR {chain[k + 1]} = VAR {chain[k]}." for k in range(len(chain) - 1)]
        needles += [(at, tokenizer.encode(s)) for at, s in zip([start, *depths], statements)]
    question = (
        f" Question: Find all variables that are assigned the value {values[0]} in the text above. "
        f"Answer: According to the chain of variable assignment in the text above, {VT_HOPS} variables "
        f"are assigned the value {values[0]}, they are:"
    )
    q, answer = _split_answer(tokenizer, question, " " + ", ".join(chains[0]))
    return _place(tokenizer, docs, rng, length, needles, q), answer, list(chains[0]), False


def _word_list(tokenizer, docs, rng, length, intro, question, items, numbered, make_words):
    """Corpus filler, `intro`, a word list, `question`: `length` tokens. `make_words(n)` draws a list of
    about `n` words (as many as the budget holds); words other than the answer's `items` are dropped
    from its end until it fits, so the answer's words keep their lead."""
    q, answer = _split_answer(tokenizer, question, " " + ", ".join(items))
    head = tokenizer.encode(intro)
    budget = length - len(head) - len(q)

    def piece(i, w):
        return tokenizer.encode(f" {i + 1}. {w}" if numbered else f" {w}")

    per_word = np.mean([len(piece(i, w)) for i, w in enumerate(items * 4)])
    words = make_words(max(int(budget / per_word), 1))
    while True:
        body = [t for i, w in enumerate(words) for t in piece(i, w)]
        if len(body) <= budget:
            break
        # Drop about one word per two tokens over budget at once, never one of the answer's.
        excess = max((len(body) - budget) // 3, 1)
        drop = set([i for i in range(len(words) - 1, -1, -1) if words[i] not in items][:excess])
        if not drop:
            raise ValueError(f"the answer's words alone exceed {length} tokens; evaluate longer lengths")
        words = [w for i, w in enumerate(words) if i not in drop]
    filler = read_haystack(docs, budget - len(body), rng, drop_ids=_drop_ids(tokenizer))
    return np.concatenate([filler, head, body, q]).astype(np.int64), answer


def _common_words(tokenizer, docs, pool, length, depth, rng):
    common = [str(w) for w in rng.choice(pool, size=CWE_WORDS, replace=False)]
    others = [w for w in pool if w not in common]

    def make_words(n_items):
        reps = int(np.clip(n_items // 20, 2, 30))
        # Besides the common words' copies, other words at most reps - 1 times each.
        rare, counts = [], {}
        for w in rng.choice(others, size=max(n_items - CWE_WORDS * reps, 0)):
            w = str(w)
            if counts.get(w, 0) < reps - 1:
                counts[w] = counts.get(w, 0) + 1
                rare.append(w)
        words = common * reps + rare
        rng.shuffle(words)
        return words

    tokens, answer = _word_list(
        tokenizer, docs, rng, length,
        " Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.",
        f" Question: What are the {CWE_WORDS} most common words in the above list? Answer: The top "
        f"{CWE_WORDS} words that appear most often in the list are:",
        common, True, make_words,
    )  # fmt: skip
    return tokens, answer, common, False


def _frequent_words(tokenizer, docs, pool, length, depth, rng):
    vocab = [str(w) for w in rng.choice(pool, size=min(len(pool), 60), replace=False)]

    def make_words(n_items):
        # Zipf(1.5) counts over the words that fit, the top FWE_WORDS strictly above the rest.
        n_vocab = min(len(vocab), max(n_items // 3, FWE_WORDS + 1))
        weights = 1.0 / np.arange(1, n_vocab + 1) ** 1.5
        counts = np.maximum((weights / weights.sum() * n_items).astype(int), 1)
        for r in range(FWE_WORDS, 0, -1):
            counts[r - 1] = max(counts[r - 1], counts[r] + 1)
        words = [w for w, c in zip(vocab, counts) for _ in range(c)]
        rng.shuffle(words)
        return words

    top = vocab[:FWE_WORDS]
    tokens, answer = _word_list(
        tokenizer, docs, rng, length,
        " Read the following coded text and track the frequency of each coded word. Find the three most "
        "frequently appeared coded words. Coded text:",
        " Question: What are the three most frequently appeared words in the above coded text? Answer: "
        "According to the coded text above, the three most frequently appeared words are:",
        top, False, make_words,
    )  # fmt: skip
    return tokens, answer, top, False


def _passkey(tokenizer, docs, pool, length, depth, rng, n_digits=5):
    # The key's digits are single tokens and end the sample: the prompt is all before them.
    hay = read_haystack(docs, length + n_digits + 3, rng, drop_ids=_drop_ids(tokenizer))
    s = make_passkey_sample(tokenizer, hay, length + n_digits, depth, rng, n_digits=n_digits)
    return s.tokens[:length], s.tokens[length:].tolist(), [s.key], True


TaskFn = Callable  # (tokenizer, docs, pool, length, depth, rng) -> (tokens, answer_tokens, items, ordered)

TASKS: dict[str, TaskFn] = {
    "passkey": _passkey,
    "niah_single_number": _niah("number", 1, 1, 1),
    "niah_single_word": _niah("word", 1, 1, 1),
    "niah_single_uuid": _niah("uuid", 1, 1, 1),
    "niah_multikey": _niah("number", 1 + NUM_DISTRACTORS, 1, 1),
    "niah_multivalue": _niah("number", 1, NUM_VALUES, 1),
    "niah_multiquery": _niah("number", NUM_QUERIES, 1, NUM_QUERIES),
    "vt": _variable_tracking,
    "cwe": _common_words,
    "fwe": _frequent_words,
}


def parse_tasks(text: str) -> list[str]:
    """`all` or comma-separated task names, checked."""
    if text.strip() == "all":
        return list(TASKS)
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in TASKS]
    if bad or not names:
        raise ValueError(f"unknown RULER task(s) {bad or text!r}; choose from: all, {', '.join(TASKS)}")
    return names


def ruler_sample(
    tokenizer, docs, task: str, length: int, depth: float, seed: int, index: int, passkey_digits: int = 5
) -> RulerSample:
    """Sample `index` of `task` at (`length`, `depth`): a pure function of its arguments and the corpus.
    `passkey_digits`: the key length of the `passkey` task (a run's `data.passkey_digits`, so the task
    asks in the format the model was trained on)."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; choose from {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depths must lie in [0, 1], got {depth}")
    task_id = zlib.crc32(task.encode())
    rng = np.random.default_rng([seed & (2**64 - 1), task_id, length, round(depth * 1_000_000), index])
    pool = word_pool(tokenizer, docs)
    options = {"n_digits": passkey_digits} if task == "passkey" else {}
    tokens, answer_tokens, items, ordered = TASKS[task](tokenizer, docs, pool, length, depth, rng, **options)
    assert len(tokens) == length, (task, len(tokens), length)
    return RulerSample(task, tokens, list(answer_tokens), tokenizer.decode(answer_tokens), items, ordered)


ITEM = re.compile(r"[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*")
# Tokens generated beyond the reference answer's: the same text may be tokenized differently, and
# items in another order (where order is free) may take a few more tokens.
SLACK, UNORDERED_SLACK = 2, 4


def new_tokens_for(sample: RulerSample) -> int:
    """Tokens to generate for `sample`: its answer's and a little slack."""
    return len(sample.answer_tokens) + (SLACK if sample.ordered else UNORDERED_SLACK)


def score(sample: RulerSample, text: str) -> tuple[bool, float]:
    """`(exact, items)` for the decoded generation `text`: exact when its first items (words, numbers,
    hyphenated UUIDs) are the answer's (as a set where order is free), and the fraction of the answer's
    items that occur in `text` (RULER's partial score)."""
    found = sum(item in text for item in sample.items) / len(sample.items)
    got = ITEM.findall(text)[: len(sample.items)]
    if sample.ordered:
        return got == sample.items, found
    return sorted(got) == sorted(sample.items), found


# (prompts [B, T], new tokens n) -> generated tokens [B, n] (greedy).
GenerateFn = Callable[[torch.Tensor, int], torch.Tensor]


def greedy_generate(model) -> GenerateFn:
    from longctx.generation import generate

    return lambda tokens, n: generate(model, tokens, max_new_tokens=n).new_tokens


@torch.no_grad()
def evaluate_ruler(
    model,
    tokenizer,
    docs,
    tasks: list[str],
    lengths: list[int],
    depths: list[float],
    samples: int,
    seed: int = 0,
    batch_size: int = 1,
    generate: GenerateFn | None = None,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
    reduce: Callable[[list[float]], list[float]] | None = None,
    passkey_digits: int = 5,
) -> dict:
    """Exact-match and item accuracy of every task at every (length, depth).

    Args:
        model: a `Transformer` (put in eval mode and restored).
        tokenizer, docs: the run's tokenizer and the corpus (`TokenDocuments`) the samples come from.
        tasks: names from `TASKS`; lengths: prompt lengths in tokens; depths: in [0, 1].
        samples: samples per (task, length, depth); seed: with those, determines every sample.
        batch_size: prompts generated together (all of one cell have the same length).
        generate: `(prompts [B, T], n) -> [B, n]` greedy continuation; default `longctx.generate`.
        shard, reduce: as `evaluate_niah` (data-parallel processes split the samples and sum counts).
        passkey_digits: the `passkey` task's key length (`ruler_sample`).

    Returns:
        `{"tasks", "lengths", "depths", "samples", "seed", "accuracy": {task: [[exact per depth] per
        length]}, "items": (same shape), "examples": {task: [sample 0's answer and generated text per
        (length, depth)]}}`.
    """
    if samples < 1 or batch_size < 1:
        raise ValueError(f"samples and batch_size must be >= 1, got {samples} and {batch_size}")
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown RULER task {task!r}; choose from {', '.join(TASKS)}")
    generate = generate or greedy_generate(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    accuracy = {t: [[0.0] * len(depths) for _ in lengths] for t in tasks}
    items = {t: [[0.0] * len(depths) for _ in lengths] for t in tasks}
    examples = {}
    total = len(tasks) * len(lengths) * len(depths) * samples
    bar = tqdm(total=total, desc="ruler", unit="sample", disable=not progress)
    try:
        for task in tasks:
            for i, length in enumerate(lengths):
                for j, depth in enumerate(depths):
                    exact, found = 0.0, 0.0
                    mine = list(range(shard[0], samples, shard[1]))
                    # Every process runs the same number of batches (context-parallel groups generate
                    # together); one out of samples repeats its last and does not count it.
                    n_batches = -(-len(range(0, samples, shard[1])) // batch_size)
                    for b in range(n_batches):
                        indices = mine[b * batch_size : (b + 1) * batch_size]
                        counted = len(indices)
                        indices = indices or [mine[-1] if mine else 0]
                        batch = [
                            ruler_sample(tokenizer, docs, task, length, depth, seed, k, passkey_digits)
                            for k in indices
                        ]
                        prompts = torch.from_numpy(np.stack([s.tokens for s in batch])).to(device)
                        out = generate(prompts, max(new_tokens_for(s) for s in batch)).cpu()
                        for k, s, row in list(zip(indices, batch, out))[:counted]:
                            text = tokenizer.decode(row[: new_tokens_for(s)].tolist())
                            hit, share = score(s, text)
                            exact += hit
                            found += share
                            if k == 0:  # the first process always holds sample 0
                                example = {
                                    "length": length,
                                    "depth": depth,
                                    "answer": s.answer,
                                    "generated": text,
                                }
                                examples.setdefault(task, []).append(example)
                        bar.update(counted * shard[1])
                    if reduce is not None:
                        exact, found = reduce([exact, found])
                    accuracy[task][i][j] = round(exact) / samples
                    items[task][i][j] = found / samples
    finally:
        bar.close()
        model.train(was_training)
    return {
        "tasks": list(tasks),
        "lengths": list(lengths),
        "depths": list(depths),
        "samples": samples,
        "seed": seed,
        "accuracy": accuracy,
        "items": items,
        "examples": examples,
    }


def ruler_table(results: dict) -> str:
    """Exact match per task (rows) and length (columns, averaged over depths), with the mean."""
    lengths = results["lengths"]
    head = ["task", *[str(n) for n in lengths], "mean"]
    rows = []
    for task in results["tasks"]:
        per_length = [float(np.mean(row)) for row in results["accuracy"][task]]
        rows.append([task, *[f"{x:.2f}" for x in per_length], f"{np.mean(per_length):.2f}"])
    means = [
        np.mean([np.mean(results["accuracy"][t][i]) for t in results["tasks"]]) for i in range(len(lengths))
    ]
    rows.append(["mean", *[f"{x:.2f}" for x in means], f"{np.mean(means):.2f}"])
    widths = [max(len(r[k]) for r in [head, *rows]) for k in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths)))
        for r in [head, *rows]
    ]
    title = (
        f"RULER-style suite: exact match by task and length ({results['samples']} samples per depth, "
        f"depths {', '.join(f'{d:g}' for d in results['depths'])})"
    )
    return "\n".join([title, *lines])


def plot_ruler(results: dict, out_dir: str | Path) -> list[Path]:
    """`heatmap_<task>.png` (lengths x depths) per task and `summary.png` (accuracy by length, a line
    per task); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from longctx.eval.niah import plot_heatmap

    out = Path(out_dir)
    paths = []
    for task in results["tasks"]:
        cell = {
            "lengths": results["lengths"],
            "depths": results["depths"],
            "accuracy": results["accuracy"][task],
            "digit_accuracy": results["items"][task],
            "samples": results["samples"],
        }
        path = plot_heatmap(cell, out / f"heatmap_{task}.png", title=f"{task}: exact match (items found)")
        paths.append(path)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for task in results["tasks"]:
        ax.plot(results["lengths"], [np.mean(r) for r in results["accuracy"][task]], marker="o", label=task)
    ax.set_xscale("log", base=2)
    ax.set_xticks(results["lengths"], [str(n) for n in results["lengths"]])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("exact match (mean over depths)")
    ax.set_title(f"RULER-style suite ({results['samples']} samples per cell)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=120)
    plt.close(fig)
    return [*paths, out / "summary.png"]


def write_ruler(results: dict, out_dir: str | Path) -> tuple[Path, list[Path]]:
    """Write `out_dir/results.json`, a heatmap per task and `summary.png`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    return json_path, plot_ruler(results, out)
