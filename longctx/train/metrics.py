"""What a run reports: `metrics.jsonl` (one JSON object per logged step), a progress bar with loss,
tokens/s and ETA, wandb (offline unless asked), and a loss-curve PNG at the end."""

import json
import math
import os
from pathlib import Path

from tqdm import tqdm


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg, total_steps: int, start_step: int = 0, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / "metrics.jsonl"
        self.bar = None
        self.wandb_run = None
        if not enabled:
            return
        if cfg.train.progress:
            self.bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )
        if cfg.train.wandb:
            self.wandb_run = _start_wandb(cfg, self.run_dir)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self.bar.update(step - self.bar.n)

    def write(self, message: str) -> None:
        if self.enabled:
            (tqdm.write if self.bar is not None else print)(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


class LengthMeter:
    """Loss and tokens/s of each sequence length over a logging window, for length mixtures: `add` every
    step, `pop` at a logged step gives `{"loss@L": mean step loss, "tokens_per_s@L": tokens / seconds
    of the steps at L}` and starts a new window. Falsy until a step was added."""

    def __init__(self):
        self.window: dict[int, list[float]] = {}
        self.seen = False

    def __bool__(self) -> bool:
        return self.seen

    def add(self, seq_len: int, loss: float, tokens: int, seconds: float) -> None:
        self.seen = True
        sums = self.window.setdefault(seq_len, [0.0, 0, 0, 0.0])
        sums[0] += loss
        sums[1] += 1
        sums[2] += tokens
        sums[3] += seconds

    def pop(self) -> dict:
        out = {}
        for n, (loss, steps, tokens, seconds) in sorted(self.window.items()):
            out[f"loss@{n}"] = loss / steps
            out[f"tokens_per_s@{n}"] = tokens / max(seconds, 1e-9)
        self.window = {}
        return out


def _start_wandb(cfg, run_dir: Path):
    import dataclasses

    import wandb

    return wandb.init(
        project=cfg.train.wandb_project,
        dir=str(run_dir),
        mode=cfg.train.wandb_mode,
        config=dataclasses.asdict(cfg),
        name=run_dir.name,
        reinit="finish_previous",
    )


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(run_dir: str | Path) -> Path | None:
    """Write `run_dir/loss.png` from `metrics.jsonl` (train loss, and validation loss if logged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train", alpha=0.6)
    # A length mixture logs each length's training loss (loss@L); train.eval_lengths its validation
    # loss (val_loss@L): one line per length, so forgetting at a short length shows.
    for prefix, style, name in (("loss@", "-", "train"), ("val_loss@", "o-", "validation")):
        lengths = sorted({int(k[len(prefix) :]) for r in records for k in r if k.startswith(prefix)})
        for n in lengths:
            points = [(r["step"], r[f"{prefix}{n}"]) for r in records if f"{prefix}{n}" in r]
            ax.plot(*zip(*points), style, label=f"{name} at {n} tokens", markersize=3)
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val and not any(k.startswith("val_loss@") for r in records for k in r):
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(run_dir) / "loss.png"
    # Written aside and renamed: a full disk leaves the previous picture, never a truncated one.
    tmp = out.with_name(".loss.png.tmp")
    fig.tight_layout()
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, out)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return out
