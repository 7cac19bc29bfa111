"""Perplexity by position: does the model use its context, and does it hold up past its training length?

    results = evaluate_ppl(model, data.val, seq_len=1024, batch_size=4, batches=8, n_buckets=8)
    write_ppl(results, "runs/x/ppl")         # ppl.json and ppl.png
    print(ppl_table(results))
    compare = {"pretrained": [results_256, results_512], "extended": [...]}   # per run, per length
    print(ppl_compare_table(compare)); write_ppl_compare(compare, "runs/x/ppl-compare")

The validation samples are the packed corpus samples of `PackedSampler` (no passkey mixture), the
same ones the trainer's validation loss reads. The next-token loss of every position is averaged
within `n_buckets` equal position buckets; a model that uses its context has a falling loss from
bucket to bucket, and one that fails past its training length has a rising one. The LM head is
applied a slice of positions at a time, so `[B, T, vocab]` is never held for long T.
"""

import functools
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from longctx.data.sampler import PackedSampler

# (inputs [B, T], targets [B, T]) -> next-token loss [B, T] (fp32).
TokenLossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def token_losses(model, inputs: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Next-token cross-entropy `[B, T]` (fp32) of `inputs` `[B, T]` against `targets` `[B, T]`,
    the LM head applied `chunk` positions at a time."""
    hidden = model(inputs, return_hidden=True)  # [B, T, dim]
    out = torch.empty(targets.shape, dtype=torch.float32, device=targets.device)
    for start in range(0, targets.shape[1], chunk):
        logits = model.output(hidden[:, start : start + chunk]).float()
        piece = targets[:, start : start + chunk]
        out[:, start : start + chunk] = F.cross_entropy(
            logits.flatten(0, 1), piece.flatten(), reduction="none"
        ).view_as(piece)
    return out


@torch.no_grad()
def evaluate_ppl(
    model,
    docs,
    seq_len: int,
    batch_size: int = 1,
    batches: int = 4,
    n_buckets: int = 8,
    seed: int = 0,
    forward: TokenLossFn | None = None,
    progress: bool = True,
) -> dict:
    """Mean loss and perplexity of each position bucket over the first `batches` batches.

    Args:
        model: a `Transformer` (its device is used; eval mode during the call).
        docs: `TokenDocuments` of held-out text (a prepared dataset's `val`).
        seq_len: tokens the model reads per sample.
        batch_size: samples per forward pass.
        batches: batches to average over.
        n_buckets: position buckets (`seq_len` must divide into them).
        seed: orders the samples (as `train.seed` does the validation sampler's).
        forward: `(inputs, targets) -> loss [B, T]`; default `token_losses(model, ...)`.
        progress: show a progress bar.

    Returns:
        `{"seq_len", "buckets": [[first, last + 1] per bucket], "loss": [...], "ppl": [...],
        "overall_loss", "overall_ppl" (over every position), "tokens": tokens scored, "samples"}`.
    """
    if seq_len % n_buckets:
        raise ValueError(f"seq_len {seq_len} does not split into {n_buckets} equal buckets; pick a divisor")
    forward = forward or functools.partial(token_losses, model)
    device = next(model.parameters()).device
    sampler = PackedSampler(docs, seq_len=seq_len, batch_size=batch_size, seed=seed)
    was_training = model.training
    model.eval()
    sums = torch.zeros(n_buckets, dtype=torch.float64)
    try:
        for index in tqdm(range(batches), desc="ppl", unit="batch", disable=not progress):
            tokens = sampler.get_batch(index).tokens.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                losses = forward(tokens[:, :-1], tokens[:, 1:])  # [B, T]
            sums += losses.double().view(losses.shape[0], n_buckets, -1).sum(dim=(0, 2)).cpu()
    finally:
        model.train(was_training)
    width = seq_len // n_buckets
    per_bucket = batches * batch_size * width
    loss = (sums / per_bucket).tolist()
    overall = float(sums.sum()) / (per_bucket * n_buckets)
    return {
        "seq_len": seq_len,
        "buckets": [[k * width, (k + 1) * width] for k in range(n_buckets)],
        "loss": loss,
        "ppl": [math.exp(x) for x in loss],
        "overall_loss": overall,
        "overall_ppl": math.exp(overall),
        "tokens": batches * batch_size * seq_len,
        "samples": batches * batch_size,
    }


def ppl_table(results: dict) -> str:
    lines = [f"perplexity by position ({results['samples']} samples of {results['seq_len']} tokens)"]
    lines.append(f"{'positions':>13}  {'loss':>7}  {'ppl':>9}")
    for (a, b), loss, ppl in zip(results["buckets"], results["loss"], results["ppl"]):
        lines.append(f"{f'{a}-{b - 1}':>13}  {loss:7.4f}  {ppl:9.2f}")
    lines.append(f"{'all':>13}  {results['overall_loss']:7.4f}  {results['overall_ppl']:9.2f}")
    return "\n".join(lines)


def ppl_compare_table(compare: dict[str, list[dict]]) -> str:
    """Runs side by side: `compare` maps a run's name to its `evaluate_ppl` results, one per length
    (the same lengths in the same order for every run). A row per position bucket and one for all
    positions, a perplexity column per run, and each later run's change against the first."""
    names = list(compare)
    first = compare[names[0]]
    width = max(10, *(len(n) for n in names))
    head = f"{'length':>6}  {'positions':>11}  " + "  ".join(f"{n:>{width}}" for n in names)
    head += "".join(f"  {'vs ' + names[0]:>{width}}" for _ in names[1:])
    lines = [f"perplexity on held-out text ({first[0]['samples']} samples per length)", head]
    for i, res in enumerate(first):
        rows = [(f"{a}-{b - 1}", k) for k, (a, b) in enumerate(res["buckets"])] + [("all", None)]
        for label, k in rows:
            values = [compare[n][i]["overall_ppl"] if k is None else compare[n][i]["ppl"][k] for n in names]
            line = f"{res['seq_len']:>6}  {label:>11}  " + "  ".join(f"{v:>{width}.2f}" for v in values)
            line += "".join(f"  {f'{(v / values[0] - 1) * 100:+.1f}%':>{width}}" for v in values[1:])
            lines.append(line)
    return "\n".join(lines)


def write_ppl_compare(compare: dict[str, list[dict]], out_dir: str | Path) -> tuple[Path, Path]:
    """Write `out_dir/ppl-compare.json` and `out_dir/ppl-compare.png` (a panel per length, loss by
    position, a line per run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "ppl-compare.json"
    json_path.write_text(json.dumps(compare, indent=2) + "\n")
    n_lengths = len(next(iter(compare.values())))
    fig, axes = plt.subplots(1, n_lengths, figsize=(4.5 * n_lengths, 3.5), squeeze=False)
    for i, ax in enumerate(axes[0]):
        for name, results in compare.items():
            res = results[i]
            centers = [(a + b) / 2 for a, b in res["buckets"]]
            ax.plot(centers, res["loss"], "o-", label=f"{name} (ppl {res['overall_ppl']:.1f})")
        ax.set_xlabel("position (bucket centre)")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"{res['seq_len']} tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png_path = out / "ppl-compare.png"
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return json_path, png_path


def write_ppl(results: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `out_dir/ppl.json` and a plot of loss by position, `out_dir/ppl.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "ppl.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    centers = [(a + b) / 2 for a, b in results["buckets"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(centers, results["loss"], "o-")
    ax.set_xlabel("position in the context (bucket centre)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"loss by position, seq_len {results['seq_len']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path = out / "ppl.png"
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return json_path, png_path
