"""The training loop: data -> model -> loss -> optimizer, in one process or many.

    trainer = Trainer(load_config("configs/tiny.yaml", ["train.steps=30"]))
    trainer.train()
    trainer.close()

Under torchrun every process runs this same loop. Each data-parallel rank draws its own batch; the
`parallel.cp` ranks of a context-parallel group share one batch and each keeps its zigzag shard of
every sequence. The loss is the mean over every token of the DP x CP group.

Checkpoints (`longctx.train.checkpoint`) are written every `train.ckpt_every` steps and at the last
step; a new run in the same `train.run_dir` resumes from the newest good one (`train.resume=auto`),
and `metrics.jsonl` is cut back to the resumed step (the rest moved to `metrics.jsonl.step_N.bak`), so
it reads like one uninterrupted run. Rank 0 holds the run directory's lock (`longctx.train.run_dir`);
starting afresh over an earlier run is an error unless `train.resume=none train.overwrite=true`.
`train.init_from` starts a new run from another run's weights only.
"""

import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch

from longctx.config import Config, save_config
from longctx.data import build_samplers, load_tokenizer, prepare_dataset
from longctx.kernels.common import set_backend as set_kernel_backend
from longctx.kernels.common.tuning import synchronize as synchronize_tuning
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
from longctx.train.run_dir import RunLock, check_history, keep_metrics_upto


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


def answer_weighted_loss(
    losses: torch.Tensor, correct: torch.Tensor | None, answers: torch.Tensor, weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training objective when passkey answer digits weigh `weight` times an ordinary token.

    `losses` `[B, T]` are the per-token fp32 losses and `correct` `[B, T]` the argmax hits of the
    chunked LM head (`Transformer.forward(..., targets=)`); `answers` `[B, T]` bool marks target
    positions that are answer digits. Returns the weighted summed loss (what is back-propagated,
    divided by the token count), the plain summed loss (what is reported), and the 0-dim tensors
    `[answer loss sum, answer tokens, answers right]` for the log (no host sync here).
    """
    plain = losses.sum()
    mask = answers.to(losses.dtype)
    answer_sum = (losses * mask).sum()
    weighted = plain if weight == 1.0 else plain + (weight - 1.0) * answer_sum
    right = (correct & answers).sum() if correct is not None else torch.zeros((), device=losses.device)
    return weighted, plain, torch.stack([answer_sum.detach(), mask.sum(), right.to(mask.dtype)])


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        set_kernel_backend(None if cfg.train.kernels == "auto" else cfg.train.kernels)
        self.dist = init_distributed(cfg)
        check_same_config(cfg, self.dist)
        self.device = self.dist.device
        self.run_dir = Path(cfg.train.run_dir)
        self.lock = None
        self._tuned_in_sync = False
        on_rank0(self.lock_run_dir, self.dist)
        # Before anything is written: the checkpoint to resume, or an error if a fresh start would
        # overwrite an earlier run.
        resume_from, history_note = on_rank0(self.find_resume, self.dist)
        if self.dist.is_main:
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

        # FSDP2: every rank builds on meta and materialises its shards only; Hugging Face weights of an
        # all-dense model are then read slice by slice (other init_from sources load whole, first).
        load_whole = resume_from is None and cfg.train.init_from and not self.sharded_init_from()
        on_meta = cfg.parallel.fsdp and not cfg.model.tie_embeddings and not load_whole
        model = build_model(cfg.model, "meta" if on_meta else self.device, seed=cfg.train.seed)
        model.activation_checkpointing = cfg.train.activation_checkpointing
        model.activation_offload = cfg.train.activation_offload
        model.loss_chunk, model.loss_impl = cfg.train.loss_chunk, cfg.train.loss_impl
        # Micro-batches per optimizer step; the global batch is batch_size x grad_accum x dp.
        self.grad_accum = cfg.train.accum_steps(cfg.data.seq_len, self.dist.dp_size)
        self.param_shapes = param_shapes(model)
        init_note = ""
        if resume_from is None and cfg.train.init_from and not on_meta:
            init_note = self.init_weights(model, cfg.train.init_from)
        if self.dist.cp_size > 1:
            parallelize_model(
                model, self.dist.cp_group, cfg.parallel.cp_comm, cfg.parallel.ulysses_size,
                cfg.parallel.deterministic,
            )  # fmt: skip
        self.model = model
        universal = resume_from is not None and self.needs_universal(resume_from)
        self.engine = build_engine(
            model, cfg, self.dist, load_universal=universal, grad_accum=self.grad_accum
        )
        if resume_from is None and cfg.train.init_from and on_meta:
            init_note = self.init_weights(model, cfg.train.init_from)
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
            # Resumed: records after the checkpoint; a torchrun restart before any checkpoint: all.
            kept_aside = keep_metrics_upto(self.run_dir, self.step)
            if kept_aside:
                history_note = f"metrics.jsonl records after step {self.step} moved to {kept_aside}"
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
                    "raise train.steps to continue, or start afresh in a new train.run_dir"
                )
        elif init_note:
            self.metrics.write(init_note)
        if history_note:
            self.metrics.write(history_note)

    def lock_run_dir(self) -> None:
        """Rank 0: take the run directory's lock (ValueError naming the holder if another run has it)."""
        self.lock = RunLock.acquire(self.run_dir)

    def find_resume(self) -> tuple[Path | None, str]:
        """Rank 0: the checkpoint to resume from (`train.resume`), after making sure a fresh start
        would not overwrite an earlier run; and a note for the log."""
        resume_from = find_resume(self.cfg, self.run_dir)
        return resume_from, check_history(self.run_dir, self.cfg, resume_from, self.lock)

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
        self.sampler.position = (step - start) * self.sampler.global_batch * self.grad_accum
        self.stage = stage
        return True

    def sharded_init_from(self) -> bool:
        """Whether train.init_from is read per shard: a Hugging Face model kept all dense."""
        return self.cfg.train.init_from.startswith("hf:") and set(self.cfg.model.pattern) == {"D"}

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

    def train_step(self, batches: list) -> dict:
        """One optimizer step over `grad_accum` micro-batches (`PackedBatch`es; gradients sync on the
        last); returns the global mean loss, grad norm, tokens and bytes sent, the loss and accuracy on
        passkey answer digits when the batches have any, and the mean documents per sample."""
        weight = self.cfg.train.answer_loss_weight
        loss_sum = torch.zeros((), device=self.device)
        answer_stats = torch.zeros(3, device=self.device)
        count, n_docs, n_samples = 0, 0.0, 0
        reset_comm_stats()
        for index, batch in enumerate(batches):
            docs = self.documents(batch.doc_starts)
            inputs, targets, layout = self.shard(batch.tokens.to(self.device), docs)
            if batch.doc_starts is not None:
                n_docs += float(Documents.from_starts(batch.doc_starts[:, :-1]).num_docs().sum())
                n_samples += batch.tokens.shape[0]
            # The mask marks answer tokens of the full sequence: their targets, sharded like the targets.
            _, answers, _ = self.shard(batch.answer_mask.to(self.device))
            with self.engine.accumulating(last=index == len(batches) - 1), self.autocast():
                losses, correct = self.engine(inputs, layout, targets=targets)
                weighted, plain, stats = answer_weighted_loss(losses, correct, answers, weight)
                # The local mean: engines average gradients over DP x CP ranks, whose token counts are
                # equal, and divide by the micro-batches of the step.
                self.engine.backward(weighted / targets.numel())
            loss_sum += plain.detach()
            answer_stats += stats
            count += targets.numel()
        comm = comm_stats()["bytes_sent"]
        grad_norm = self.engine.step()
        total, n_tokens, answer_loss, n_answers, right, docs_sum, samples = all_reduce_sum(
            [loss_sum.item(), float(count), *answer_stats.tolist(), n_docs, float(n_samples)], self.dist
        )
        out = {"loss": total / n_tokens, "grad_norm": grad_norm, "tokens": int(n_tokens), "comm_bytes": comm}
        if docs_sum:
            out["docs_per_sample"] = docs_sum / samples
        if n_answers and self.cfg.train.loss_impl == "chunked":
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
                losses, _ = self.engine(inputs, layout, targets=targets)
            loss_sum, count = loss_sum + losses.sum().item(), count + targets.numel()
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
            out = self.train_step([self.sampler.next_batch() for _ in range(self.grad_accum)])
            if not self._tuned_in_sync:
                # Every rank has now met its kernels' shapes: adopt rank 0's tuned configs.
                synchronize_tuning()
                self._tuned_in_sync = True
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
            try:
                plot_loss(self.run_dir)
            except OSError as e:
                print(f"longctx: warning: loss.png not written: {e}")
        if self.lock is not None:
            self.lock.release()
        shutdown()
