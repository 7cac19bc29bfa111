"""Needle-in-a-haystack evaluation: does the model repeat a passkey hidden at depth d of L tokens?

    results = evaluate_niah(model, tok, docs, NiahOptions(lengths=[256, 512], depths=[0, 0.5, 1], samples=20))
    write_niah(results, "runs/x/niah")       # results.json and heatmap.png
    print(niah_table(results))

Samples come from `longctx.data.passkey.make_passkey_sample`, the function training's passkey mixture
uses, so the model is asked in exactly the format it was taught. A sample "at length L" is L + 1
tokens; the model reads the first L (like a training sample of `data.seq_len = L`), and the answer is
the last `n_digits` tokens, predicted at the last `n_digits` input positions. Teacher-forced: a sample
is retrieved when the argmax at every answer position equals the answer digit, which is what greedy
decoding would produce, in one forward pass. Sample `i` at (length, depth) is a pure function of
(seed, length, depth, i).

Only the answer positions' logits are needed: `answer_logits` runs the model to its final-norm hidden
states and applies the LM head to those few positions, never holding `[B, T, vocab]`. The `forward`
argument replaces it (e.g. by a context-parallel version) with the same contract.
"""

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from longctx.data.passkey import PasskeySample, make_passkey_sample, read_haystack

# (tokens [B, T], positions [B, n]) -> logits [B, n, vocab] at those positions.
AnswerLogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def answer_logits(model, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits `[B, n, vocab]` at `positions` `[B, n]` of `tokens` `[B, T]`: the LM head is applied
    to the gathered final-norm hidden states only."""
    hidden = model(tokens, return_hidden=True)  # [B, T, dim]
    index = positions[..., None].expand(-1, -1, hidden.shape[-1])
    return model.output(hidden.gather(1, index))


def context_parallel_answer_logits(model, cp_rank: int, cp_size: int, cp_group) -> AnswerLogitsFn:
    """`answer_logits` for a model made context-parallel (`parallelize_model`): every rank of the CP
    group passes the same full `tokens`, runs its zigzag shard, projects the requested positions it
    holds, and the group sums the logits, so each rank returns the full `[B, n, vocab]`."""
    import torch.distributed as dist

    from longctx.parallel import SeqLayout, zigzag_shard

    def forward(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        layout = SeqLayout.zigzag(tokens.shape[1], cp_rank, cp_size)
        hidden = model(zigzag_shard(tokens, cp_rank, cp_size), layout, return_hidden=True)
        # Local index of each global position this rank holds, -1 elsewhere.
        local = torch.full((tokens.shape[1],), -1, dtype=torch.long, device=tokens.device)
        held_positions = layout.positions(tokens.device)
        local[held_positions] = torch.arange(len(held_positions), device=tokens.device)
        index = local[positions]  # [B, n]
        held = (index >= 0)[..., None]
        picked = hidden.gather(1, index.clamp_min(0)[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = (model.output(picked) * held).float()
        dist.all_reduce(logits, group=cp_group)
        return logits

    return forward


def niah_sample(
    tokenizer, haystack_docs, length: int, depth: float, seed: int, index: int, n_digits: int
) -> PasskeySample:
    """Sample `index` at (`length`, `depth`): `length + 1` tokens of haystack, needle, question and
    answer. Depths are keyed to a millionth, so 0.25 and 0.2500001 share their samples."""
    rng = np.random.default_rng([seed & (2**64 - 1), length, round(depth * 1_000_000), index])
    drop = [i for i in (tokenizer.eos_id, tokenizer.bos_id) if i >= 0]
    hay = read_haystack(haystack_docs, length + 1, rng, drop_ids=drop)
    return make_passkey_sample(tokenizer, hay, length + 1, depth, rng, n_digits)


@dataclass(frozen=True)
class NiahOptions:
    """What `evaluate_niah` measures.

    Args:
        lengths: context lengths L in tokens (the model reads L tokens).
        depths: needle depths in [0, 1] (0: start of the haystack, 1: its end).
        samples: samples per (length, depth).
        seed: with (length, depth, index), determines every sample.
        n_digits: digits of the passkey.
        batch_size: samples per forward pass.
        progress: show a progress bar.
    """

    lengths: list[int]
    depths: list[float]
    samples: int
    seed: int = 0
    n_digits: int = 5
    batch_size: int = 1
    progress: bool = True

    def __post_init__(self):
        if self.samples < 1 or self.batch_size < 1:
            raise ValueError(f"samples and batch_size must be >= 1, got {self.samples} and {self.batch_size}")
        for depth in self.depths:
            if not 0.0 <= depth <= 1.0:
                raise ValueError(f"needle depths must lie in [0, 1], got {depth}")


@torch.no_grad()
def evaluate_niah(
    model,
    tokenizer,
    haystack_docs,
    options: NiahOptions,
    forward: AnswerLogitsFn | None = None,
    shard: tuple[int, int] = (0, 1),
    reduce: Callable[[list[float]], list[float]] | None = None,
) -> dict:
    """Exact-match and per-digit retrieval accuracy for every (length, depth) of `options`.

    Args:
        model: a `Transformer` (its device is used; it is put in eval mode and restored).
        tokenizer: `longctx.tokenizer.Tokenizer` (digits are single tokens).
        haystack_docs: `TokenDocuments` whose text fills the haystack.
        options: lengths, depths, samples, seed, digits, batch size (`NiahOptions`).
        forward: `(tokens [B, T], positions [B, n]) -> logits [B, n, vocab]`; default
            `answer_logits(model, ...)`.
        shard: `(index, count)`: evaluate samples `i` with `i % count == index` only (data-parallel
            processes split the samples; every process must call with the same other arguments).
        reduce: sums a list of counts over the processes that split the samples (default: none).

    Returns:
        `{"lengths", "depths", "accuracy": [[exact match per depth] per length], "digit_accuracy":
        (same shape), "samples", "n_digits", "seed"}`.
    """
    lengths, depths, samples, seed = options.lengths, options.depths, options.samples, options.seed
    n_digits, batch_size, progress = options.n_digits, options.batch_size, options.progress
    forward = forward or functools.partial(answer_logits, model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    accuracy = [[0.0] * len(depths) for _ in lengths]
    digit_accuracy = [[0.0] * len(depths) for _ in lengths]
    bar = tqdm(total=len(lengths) * len(depths) * samples, desc="niah", unit="sample", disable=not progress)
    try:
        for i, length in enumerate(lengths):
            positions = torch.arange(length - n_digits, length, device=device)
            for j, depth in enumerate(depths):
                exact, right = 0, 0
                mine = list(range(shard[0], samples, shard[1]))
                # Every process runs the same number of batches (context-parallel groups run each
                # forward together); a process out of samples repeats its last and does not count it.
                n_batches = -(-len(range(0, samples, shard[1])) // batch_size)
                for b in range(n_batches):
                    indices = mine[b * batch_size : (b + 1) * batch_size]
                    counted = len(indices)
                    indices = indices or [mine[-1] if mine else 0]
                    batch = [
                        niah_sample(tokenizer, haystack_docs, length, depth, seed, index, n_digits)
                        for index in indices
                    ]
                    tokens = torch.from_numpy(np.stack([s.tokens for s in batch])).to(device)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                        logits = forward(tokens[:, :-1], positions.expand(len(batch), -1))
                    hit = (logits.argmax(-1) == tokens[:, -n_digits:])[:counted]  # [B, n_digits]
                    exact += int(hit.all(dim=1).sum())
                    right += int(hit.sum())
                    bar.update(counted * shard[1])
                if reduce is not None:
                    exact, right = (round(x) for x in reduce([float(exact), float(right)]))
                accuracy[i][j] = exact / samples
                digit_accuracy[i][j] = right / (samples * n_digits)
    finally:
        bar.close()
        model.train(was_training)
    return {
        "lengths": list(lengths),
        "depths": list(depths),
        "accuracy": accuracy,
        "digit_accuracy": digit_accuracy,
        "samples": samples,
        "n_digits": n_digits,
        "seed": seed,
    }


def niah_table(results: dict) -> str:
    """The results as a console table: a row per length, a column per depth, each cell
    `exact (per-digit)`, and the row means."""
    depths = results["depths"]
    head = ["length"] + [f"d={d:g}" for d in depths] + ["mean"]
    rows = []
    for length, exact, digit in zip(results["lengths"], results["accuracy"], results["digit_accuracy"]):
        cells = [f"{e:.2f} ({g:.2f})" for e, g in zip(exact, digit)]
        cells.append(f"{np.mean(exact):.2f} ({np.mean(digit):.2f})")
        rows.append([str(length), *cells])
    widths = [max(len(r[k]) for r in [head, *rows]) for k in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [head, *rows]]
    title = (
        f"needle in a haystack: exact match (per-digit accuracy), {results['samples']} samples per cell, "
        f"{results['n_digits']}-digit keys"
    )
    return "\n".join([title, *lines])


def plot_heatmap(results: dict, path: str | Path, title: str | None = None) -> Path:
    """Write a lengths x depths heatmap of exact-match accuracy, each cell annotated (exact match, and
    per-digit accuracy in parentheses)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = np.asarray(results["accuracy"], dtype=float)
    digit = np.asarray(results["digit_accuracy"], dtype=float)
    lengths, depths = results["lengths"], results["depths"]
    fig, ax = plt.subplots(figsize=(1.2 * len(depths) + 2.5, 0.7 * len(lengths) + 1.8))
    image = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context length (tokens)")
    title = title or "passkey retrieval, exact match"
    ax.set_title(f"{title} ({results['samples']} samples/cell)")
    for i in range(len(lengths)):
        for j in range(len(depths)):
            # The colormap is dark at both ends: light text there, dark in the middle.
            color = "white" if acc[i, j] < 0.2 or acc[i, j] > 0.85 else "black"
            text = f"{acc[i, j]:.2f}\n({digit[i, j]:.2f})"
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color=color)
    fig.colorbar(image, ax=ax, label="exact match")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_niah(results: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `out_dir/results.json` and `out_dir/heatmap.png`; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    return json_path, plot_heatmap(results, out / "heatmap.png")
