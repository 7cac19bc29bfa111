"""The training loop: data -> model -> loss -> AdamW, with metrics, progress and a loss curve.

trainer = Trainer(load_config("configs/tiny.yaml", ["train.steps=30"]))
trainer.train()
trainer.close()
"""

import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from longctx.config import Config, save_config
from longctx.data import build_samplers, load_tokenizer, prepare_dataset
from longctx.model import build_model
from longctx.tokenizer import copy_tokenizer
from longctx.train.metrics import MetricsLogger, plot_loss
from longctx.train.optim import build_optimizer, build_scheduler


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy (fp32) and the number of target tokens."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
    return loss, targets.numel()


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.train.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")
        seed_everything(cfg.train.seed)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

        self.tokenizer = load_tokenizer(cfg)
        copy_tokenizer(self.tokenizer, self.run_dir)
        self.data = prepare_dataset(cfg, self.tokenizer, progress=cfg.train.progress)
        self.sampler, self.val_sampler = build_samplers(cfg, self.data, self.tokenizer)
        if cfg.train.eval_every and self.val_sampler is None:
            raise ValueError(
                f"train.eval_every={cfg.train.eval_every} needs validation data, but the validation split of "
                f"{cfg.data.source!r} is empty ({self.data.val.num_docs} documents); raise data.val_fraction "
                "or set train.eval_every=0"
            )

        self.model = build_model(cfg.model, self.device)
        self.model.activation_checkpointing = cfg.train.activation_checkpointing
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.step = 0
        self.tokens = 0
        self.metrics = MetricsLogger(self.run_dir, cfg, cfg.train.steps, start_step=self.step)
        self.metrics.write(
            f"model: {self.model.num_params() / 1e6:.2f}M parameters, layers {cfg.model.pattern}, "
            f"seq_len {cfg.data.seq_len}, {self.data.train.num_tokens:,} training tokens in "
            f"{self.data.train.num_docs:,} documents, {self.data.val.num_tokens:,} validation tokens"
        )

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def train_step(self, batch: torch.Tensor) -> tuple[float, float]:
        """One optimizer step on `batch` `[B, seq_len + 1]`; returns (mean loss, grad norm)."""
        batch = batch.to(self.device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with self.autocast():
            logits = self.model(inputs)
        loss_sum, count = lm_loss(logits, targets)
        loss = loss_sum / count
        loss.backward()
        clip = self.cfg.train.grad_clip
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens += count
        return loss.item(), grad_norm.item()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss over the first `train.eval_batches` validation batches (the same batches
        every time, so values at different steps compare)."""
        self.model.eval()
        loss_sum, count = 0.0, 0
        for index in range(self.cfg.train.eval_batches):
            batch = self.val_sampler.get_batch(index).tokens.to(self.device)
            with self.autocast():
                logits = self.model(batch[:, :-1])
            batch_loss, batch_count = lm_loss(logits, batch[:, 1:])
            loss_sum, count = loss_sum + batch_loss.item(), count + batch_count
        self.model.train()
        return loss_sum / count

    def train(self) -> None:
        cfg = self.cfg.train
        self.model.train()
        start = time.perf_counter()
        window_t, window_tokens = start, self.tokens
        while self.step < cfg.steps:
            lr = self.optimizer.param_groups[0]["lr"]
            loss, grad_norm = self.train_step(self.sampler.next_batch().tokens)
            self.step += 1
            record = {"step": self.step}
            logging = self.step % cfg.log_every == 0 or self.step == cfg.steps
            if logging:
                now = time.perf_counter()
                tokens_per_s = (self.tokens - window_tokens) / max(now - window_t, 1e-9)
                window_t, window_tokens = now, self.tokens
                record.update(
                    {
                        "loss": loss,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens": self.tokens,
                        "tokens_per_s": tokens_per_s,
                        "comm_bytes": 0,
                        "elapsed_s": now - start,
                    }
                )
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                eval_start = time.perf_counter()
                record["val_loss"] = self.evaluate()
                # Evaluation time is not training time.
                window_t += time.perf_counter() - eval_start
            if len(record) > 1:
                self.metrics.log(record)
            if logging:
                self.metrics.progress(self.step, loss, tokens_per_s)

    def close(self) -> None:
        self.metrics.close()
        plot_loss(self.run_dir)
