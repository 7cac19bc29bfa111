"""The training loop: data -> model -> loss -> optimizer, in one process or many.

    trainer = Trainer(load_config("configs/tiny.yaml", ["train.steps=30"]))
    trainer.train()
    trainer.close()

Under torchrun every process runs this same loop. Each data-parallel rank draws its own batch; the
`parallel.cp` ranks of a context-parallel group share one batch and each keeps its zigzag shard of
every sequence. The loss is the mean over every token of the DP x CP group.

Checkpoints (`longctx.train.checkpoint`) are written every `train.ckpt_every` steps and at the last
step; a new run in the same `train.run_dir` resumes from the latest complete one (`train.resume=auto`),
and `metrics.jsonl` is cut back to the resumed step, so it reads like one uninterrupted run.
`train.init_from` starts a new run from another run's weights only.
"""

import json
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from longctx.config import Config, save_config
from longctx.data import build_samplers, load_tokenizer, prepare_dataset
from longctx.model import build_model
from longctx.parallel import SeqLayout, comm_stats, parallelize_model, reset_comm_stats, zigzag_shard
from longctx.parallel.layout import Documents
from longctx.tokenizer import copy_tokenizer
from longctx.train.checkpoint import (
    Checkpointer,
    check_param_shapes,
    find_resume,
    full_weights,
    param_shapes,
    read_meta,
    resolve_checkpoint,
)
from longctx.train.checkpoint_io import deepspeed_universal
from longctx.train.distributed import (
    DistInfo,
    all_reduce_sum,
    check_same_config,
    init_distributed,
    shutdown,
)
from longctx.train.engine import build_engine
from longctx.train.metrics import MetricsLogger, plot_loss


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def on_rank0(fn, info: DistInfo):
    """Run `fn` on rank 0 and give every rank its result, or raise its ValueError/FileNotFoundError on
    every rank (so all ranks agree on which checkpoint to load, and fail together)."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except (ValueError, FileNotFoundError) as e:
            error = (type(e).__name__, str(e))
    if info.enabled:
        import torch.distributed as dist

        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error:
        raise (FileNotFoundError if error[0] == "FileNotFoundError" else ValueError)(error[1])
    return result


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop the records after `step` from metrics.jsonl (a resumed run logs them again)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # A line cut short by a killed writer.
            continue
        if record["step"] <= step:
            keep.append(line)
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


# Test hook: `LONGCTX_TEST_KILL_AT_STEP=N` makes rank `LONGCTX_TEST_KILL_RANK` (default 1) kill itself
# with SIGKILL as step N begins, once per run directory (a marker file stops the restarted worker).
KILL_AT_STEP_ENV, KILL_RANK_ENV, KILL_MARKER = (
    "LONGCTX_TEST_KILL_AT_STEP",
    "LONGCTX_TEST_KILL_RANK",
    ".test-killed",
)


def _test_kill_hook(step: int, rank: int, run_dir: Path) -> None:
    if os.environ.get(KILL_AT_STEP_ENV) != str(step) or int(os.environ.get(KILL_RANK_ENV, 1)) != rank:
        return
    marker = run_dir / KILL_MARKER
    if marker.exists():
        return
    marker.write_text(f"rank {rank} killed itself at step {step}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy (fp32) and the number of target tokens."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
    return loss, targets.numel()


def answer_weighted_loss(
    logits: torch.Tensor, targets: torch.Tensor, answers: torch.Tensor, weight: float
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """The training objective when passkey answer digits weigh `weight` times an ordinary token.

    Returns the weighted summed loss (what is back-propagated, divided by the token count), the
    plain summed loss (what is reported; exactly `lm_loss`), and `[answer loss sum, answer tokens,
    answers right]` for the log. `answers` `[B, T]` bool marks target positions that are answer digits.
    """
    plain, _ = lm_loss(logits, targets)
    picked = answers.flatten().nonzero().squeeze(1)
    answer_logits = logits.flatten(0, 1)[picked].float()  # [n_answers, vocab]
    answer_targets = targets.flatten()[picked]
    answer_sum = F.cross_entropy(answer_logits, answer_targets, reduction="sum")
    weighted = plain if weight == 1.0 else plain + (weight - 1.0) * answer_sum
    right = (answer_logits.argmax(-1) == answer_targets).sum()
    return weighted, plain, [answer_sum.item(), float(len(picked)), right.item()]


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dist = init_distributed(cfg)
        check_same_config(cfg, self.dist)
        self.device = self.dist.device
        self.run_dir = Path(cfg.train.run_dir)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        seed_everything(cfg.train.seed)

        # One process per node fills the tokenizer and dataset caches; the others wait, then read.
        writer, wait = self.dist.local_rank == 0, self.dist.barrier
        self.tokenizer = load_tokenizer(cfg, is_writer=writer, wait_fn=wait)
        if self.dist.is_main:
            copy_tokenizer(self.tokenizer, self.run_dir)
        self.data = prepare_dataset(
            cfg, self.tokenizer, is_writer=writer, wait_fn=wait, progress=cfg.train.progress and writer
        )
        self.sampler, self.val_sampler = build_samplers(
            cfg, self.data, self.tokenizer, self.dist.dp_rank, self.dist.dp_size
        )
        self.stages = cfg.data.stages()
        self.stage = -1
        if cfg.train.eval_every and self.val_sampler is None:
            raise ValueError(
                f"train.eval_every={cfg.train.eval_every} needs validation data, but the validation split of "
                f"{cfg.data.source!r} is empty ({self.data.val.num_docs} documents); raise data.val_fraction "
                "or set train.eval_every=0"
            )

        resume_from = on_rank0(lambda: find_resume(cfg, self.run_dir), self.dist)
        model = build_model(cfg.model, self.device)
        model.activation_checkpointing = cfg.train.activation_checkpointing
        self.param_shapes = param_shapes(model)
        init_note = ""
        if resume_from is None and cfg.train.init_from:
            init_note = self.init_weights(model, cfg.train.init_from)
        if self.dist.cp_size > 1:
            parallelize_model(model, self.dist.cp_group, cfg.parallel.cp_comm)
        self.model = model
        universal = resume_from is not None and self.needs_universal(resume_from)
        self.engine = build_engine(model, cfg, self.dist, load_universal=universal)
        self.checkpointer = Checkpointer(self.run_dir, cfg, self.dist)
        self.step = 0
        self.tokens = 0
        if resume_from is not None:
            meta = self.checkpointer.load(resume_from, self.engine, self.param_shapes)
            self.step, self.tokens = meta["step"], meta["tokens"]
            self.enter_stage(self.step)
            saved = meta["sampler"]
            previous = self.stages[self.stage - 1][1] if self.stage > 0 else None
            # Saved on the last step of the previous schedule stage: this stage starts at its own
            # position 0 (enter_stage), so the saved position has nothing left to say.
            if not (saved.get("seq_len") != self.sampler.seq_len and saved.get("seq_len") == previous):
                self.sampler.load_state_dict(saved)
        if self.dist.is_main:
            truncate_metrics(self.run_dir, self.step)
        self.metrics = MetricsLogger(self.run_dir, cfg, cfg.train.steps, self.step, enabled=self.dist.is_main)
        self.metrics.write(
            f"model: {model.num_params() / 1e6:.2f}M parameters, layers {cfg.model.pattern}, "
            f"seq_len {cfg.data.seq_len}, {self.data.train.num_tokens:,} training tokens in "
            f"{self.data.train.num_docs:,} documents, {self.data.val.num_tokens:,} validation tokens; "
            f"{self.dist.world_size} process(es): dp {self.dist.dp_size} x cp {self.dist.cp_size}, "
            f"engine {cfg.parallel.engine}, device {self.device}"
        )
        if resume_from is not None:
            how = " through DeepSpeed's universal checkpoint" if universal else ""
            self.metrics.write(f"resumed from {resume_from} at step {self.step}{how}")
            if self.step >= cfg.train.steps:
                self.metrics.write(
                    f"step {self.step} already reaches train.steps={cfg.train.steps}: nothing to train; "
                    "raise train.steps to continue, or start afresh with train.resume=none"
                )
        elif init_note:
            self.metrics.write(init_note)

    def enter_stage(self, step: int) -> bool:
        """Make `self.sampler` the one of the `data.seq_len_schedule` stage that step `step` (from 0)
        falls in; True when that is a new stage. A stage's sampler starts at its own position 0, so
        the samples of a step depend on the step alone (a resumed run sees what it would have)."""
        stage = max(i for i, (start, _) in enumerate(self.stages) if start <= step)
        if stage == self.stage:
            return False
        start, seq_len = self.stages[stage]
        if seq_len != self.sampler.seq_len:
            self.sampler, _ = build_samplers(
                self.cfg, self.data, self.tokenizer, self.dist.dp_rank, self.dist.dp_size, seq_len=seq_len
            )
        self.sampler.position = (step - start) * self.sampler.global_batch
        self.stage = stage
        return True

    def init_weights(self, model, path: str) -> str:
        """Load only the weights of checkpoint (or run directory) `path` into `model` (before it is
        sharded): continue-training may change seq_len, RoPE scaling and the parallel layout."""
        if path.startswith("hf:"):
            from longctx.hf import init_converted, load_hf_weights

            new = load_hf_weights(model, path)
            init_converted(model, new)
            converted = f"; {len(new)} parameters of converted layers start fresh" if new else ""
            return (
                f"initialised the weights from the Hugging Face checkpoint {path[3:]} (train.init_from"
                f"{converted}; optimizer, schedule and data start fresh)"
            )
        ckpt = on_rank0(lambda: resolve_checkpoint(path, "train.init_from"), self.dist)
        weights = full_weights(ckpt)
        check_param_shapes(
            {k: list(v.shape) for k, v in weights.items()}, self.param_shapes, f"checkpoint {str(ckpt)!r}"
        )
        model.load_state_dict(weights)
        return (
            f"initialised the weights from {ckpt} (train.init_from; optimizer, schedule and data start fresh)"
        )

    def needs_universal(self, path: Path) -> bool:
        """DeepSpeed loads its own checkpoint only at the DP x CP degree and ZeRO-3-ness it was written
        at; otherwise it goes through the universal format (converted once, next to the original)."""
        meta = read_meta(path)
        if self.cfg.parallel.engine != "deepspeed" or meta["engine"] != "deepspeed":
            return False
        same_degree = meta["dp_size"] * meta["cp_size"] == self.dist.dp_size * self.dist.cp_size
        if same_degree and (meta["zero_stage"] == 3) == (self.cfg.parallel.zero_stage == 3):
            return False
        deepspeed_universal(path, self.dist)
        return True

    def save_checkpoint(self) -> None:
        state = {"tokens": self.tokens, "sampler": self.sampler.state_dict(), "params": self.param_shapes}
        self.checkpointer.save(self.step, self.engine, state)

    def autocast(self):
        # bf16 compute with fp32 master weights on GPU; plain fp32 on CPU.
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def documents(self, doc_starts: torch.Tensor | None) -> Documents | None:
        """The input tokens' document boundaries from the sampler's `[B, seq_len + 1]` starts mask, or
        None (one document per sequence) when `data.doc_mask=false` or no mask is given. The target of
        a document's last token (EOS -> the next document's first token) stays in the loss."""
        if doc_starts is None or not self.cfg.data.doc_mask:
            return None
        return Documents.from_starts(doc_starts[:, :-1], self.cfg.data.doc_positions == "per_doc")

    def shard(self, tokens: torch.Tensor, docs: Documents | None = None):
        """This rank's inputs, targets and layout from full sequences `[B, seq_len + 1]`."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        info = self.dist
        if info.cp_size == 1:
            return inputs, targets, SeqLayout.full(inputs.shape[1]).with_docs(docs)
        layout = SeqLayout.zigzag(inputs.shape[1], info.cp_rank, info.cp_size).with_docs(docs)
        return (
            zigzag_shard(inputs, info.cp_rank, info.cp_size),
            zigzag_shard(targets, info.cp_rank, info.cp_size),
            layout,
        )

    def train_step(
        self,
        batch: torch.Tensor,
        answer_mask: torch.Tensor | None = None,
        doc_starts: torch.Tensor | None = None,
    ) -> dict:
        """One optimizer step; returns the global mean loss, grad norm, tokens and bytes sent, the loss
        and accuracy on passkey answer digits when `answer_mask` `[B, seq_len + 1]` has any, and the
        mean documents per sample when `doc_starts` `[B, seq_len + 1]` is given."""
        docs = self.documents(doc_starts)
        inputs, targets, layout = self.shard(batch.to(self.device), docs)
        if answer_mask is None:
            answer_mask = torch.zeros_like(batch, dtype=torch.bool)
        # The mask marks answer tokens of the full sequence: their targets, sharded like the targets.
        _, answers, _ = self.shard(answer_mask.to(self.device))
        reset_comm_stats()
        with self.autocast():
            logits = self.engine(inputs, layout)
        count = targets.numel()
        weighted, loss_sum, answer_stats = answer_weighted_loss(
            logits, targets, answers, self.cfg.train.answer_loss_weight
        )
        # The local mean: engines average gradients over DP x CP ranks, whose token counts are equal.
        self.engine.backward(weighted / count)
        comm = comm_stats()["bytes_sent"]
        grad_norm = self.engine.step()
        n_docs = 0.0
        if doc_starts is not None:
            n_docs = float(Documents.from_starts(doc_starts[:, :-1]).num_docs().sum())
        total, n_tokens, answer_loss, n_answers, right, docs_sum, n_samples = all_reduce_sum(
            [loss_sum.item(), float(count), *answer_stats, n_docs, float(batch.shape[0])], self.dist
        )
        out = {"loss": total / n_tokens, "grad_norm": grad_norm, "tokens": int(n_tokens), "comm_bytes": comm}
        if doc_starts is not None:
            out["docs_per_sample"] = docs_sum / n_samples
        if n_answers:
            out.update(answer_loss=answer_loss / n_answers, answer_acc=right / n_answers)
        return out

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss over the first `train.eval_batches` validation batches of every
        data-parallel rank (the same batches every time, so values at different steps compare)."""
        self.model.eval()
        loss_sum, count = 0.0, 0
        for index in range(self.cfg.train.eval_batches):
            batch = self.val_sampler.get_batch(index)
            docs = self.documents(batch.doc_starts)
            inputs, targets, layout = self.shard(batch.tokens.to(self.device), docs)
            with self.autocast():
                logits = self.engine(inputs, layout)
            batch_loss, batch_count = lm_loss(logits, targets)
            loss_sum, count = loss_sum + batch_loss.item(), count + batch_count
        self.model.train()
        total, n_tokens = all_reduce_sum([loss_sum, float(count)], self.dist)
        return total / n_tokens

    def train(self) -> None:
        cfg = self.cfg.train
        self.model.train()
        start = time.perf_counter()
        window_t, window_tokens = start, self.tokens
        while self.step < cfg.steps:
            _test_kill_hook(self.step + 1, self.dist.rank, self.run_dir)
            lr = self.engine.lr
            if self.enter_stage(self.step) and len(self.stages) > 1:
                self.metrics.write(
                    f"step {self.step + 1}: seq_len {self.sampler.seq_len} "
                    f"(data.seq_len_schedule stage {self.stage + 1} of {len(self.stages)})"
                )
            batch = self.sampler.next_batch()
            out = self.train_step(batch.tokens, batch.answer_mask, batch.doc_starts)
            self.step += 1
            self.tokens += out["tokens"]
            record = {"step": self.step}
            logging = self.step % cfg.log_every == 0 or self.step == cfg.steps
            if logging:
                now = time.perf_counter()
                tokens_per_s = (self.tokens - window_tokens) / max(now - window_t, 1e-9)
                window_t, window_tokens = now, self.tokens
                record.update(
                    {
                        "loss": out["loss"],
                        "lr": lr,
                        "grad_norm": out["grad_norm"],
                        "tokens": self.tokens,
                        "tokens_per_s": tokens_per_s,
                        "comm_bytes": out["comm_bytes"],
                        "elapsed_s": now - start,
                    }
                )
                extra = ("answer_loss", "answer_acc", "docs_per_sample")
                record.update({k: out[k] for k in extra if k in out})
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                eval_start = time.perf_counter()
                record["val_loss"] = self.evaluate()
                # Evaluation time is not training time.
                window_t += time.perf_counter() - eval_start
            if len(record) > 1:
                self.metrics.log(record)
            if logging:
                self.metrics.progress(self.step, out["loss"], tokens_per_s)
            if self.step == cfg.steps or (cfg.ckpt_every and self.step % cfg.ckpt_every == 0):
                save_start = time.perf_counter()
                self.save_checkpoint()
                window_t += time.perf_counter() - save_start
        self.checkpointer.wait()

    def close(self) -> None:
        self.metrics.close()
        if self.dist.is_main:
            plot_loss(self.run_dir)
        shutdown()
