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

import random
import time
from pathlib import Path

import numpy as np
import torch

from longctx.config import Config, save_config
from longctx.data import build_samplers, load_tokenizer, open_dataset, prepare_dataset
from longctx.data.mixture import LengthSchedule, MixedSampler
from longctx.kernels.common import set_backend as set_kernel_backend
from longctx.kernels.common.tuning import synchronize as synchronize_tuning
from longctx.model import build_model
from longctx.parallel import SeqLayout, comm_stats, parallelize_model, reset_comm_stats, zigzag_shard
from longctx.parallel.layout import Documents
from longctx.tokenizer import copy_tokenizer
from longctx.train.checkpoint import Checkpointer, param_shapes, read_meta
from longctx.train.checkpoint_io import deepspeed_universal
from longctx.train.distributed import (
    DistInfo,
    all_reduce_sum,
    check_same_config,
    init_distributed,
    shutdown,
)
from longctx.train.engine import build_engine
from longctx.train.host_memory import pin_mmap_threshold, unpin_mmap_threshold
from longctx.train.metrics import LengthMeter, MetricsLogger, plot_loss
from longctx.train.run_dir import RunLock, keep_metrics_upto
from longctx.train.start import plan_start
from longctx.train.zero3 import partition_zero3
from longctx.weights import check_weights

# How to get a checkpoint that fits the model being trained.
RESUME_FIX = (
    "use the model config it was written with (see its meta.json), or start fresh in a new train.run_dir"
)


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
        # Before anything is written: how the run starts (fresh, resumed, initialised from other
        # weights), or an error if a fresh start would overwrite an earlier run.
        world = self.dist.dp_size * self.dist.cp_size
        self.start = start = on_rank0(lambda: plan_start(cfg, self.run_dir, world, self.lock), self.dist)
        history_note = start.note
        if self.dist.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
        seed_everything(cfg.train.seed)

        # One process per node fills the tokenizer and dataset caches; the others wait, then read.
        self.tokenizer = self.dist.writer_first(lambda: load_tokenizer(cfg.data, cfg.model.vocab_size))
        if self.dist.is_main:
            copy_tokenizer(self.tokenizer, self.run_dir)
        self.data = self.dist.writer_first(
            lambda: prepare_dataset(cfg.data, self.tokenizer, progress=cfg.train.progress),
            lambda: open_dataset(cfg.data, self.tokenizer),
        )
        self.sampler, self.val_sampler = self.build_samplers()
        self.stages = cfg.data.stages()
        self.stage_mixes = cfg.data.stage_mixes()
        self.stage = -1
        # Validation samplers of train.eval_lengths, made when first needed.
        self.val_samplers = {}
        if cfg.train.eval_every and self.val_sampler is None:
            raise ValueError(
                f"train.eval_every={cfg.train.eval_every} needs validation data, but the validation split of "
                f"{cfg.data.source!r} is empty ({self.data.val.num_docs} documents); raise data.val_fraction "
                "or set train.eval_every=0"
            )

        # FSDP2: every rank builds on meta and materialises its shards only; train.init_from weights
        # are then read into the shards, each rank its rows (longctx.train.sharded_load).
        on_meta = start.on_meta or start.zero_init
        # Freed full-size temporaries of the init and the load must not stay resident (host_memory).
        pin_mmap_threshold()
        model = build_model(cfg.model, "meta" if on_meta else self.device, seed=cfg.train.seed)
        model.activation_checkpointing = cfg.train.activation_checkpointing
        model.activation_offload = cfg.train.activation_offload
        model.checkpoint_every_k = cfg.train.checkpoint_every_k
        model.loss_chunk, model.loss_impl = cfg.train.loss_chunk, cfg.train.loss_impl
        # Micro-batches per optimizer step; the global batch is batch_size x grad_accum x dp.
        self.grad_accum = cfg.train.accum_steps(cfg.data.seq_len, self.dist.dp_size)
        self.param_shapes = param_shapes(model)
        num_params = model.num_params()
        if start.zero_init:
            # DeepSpeed ZeRO-3: each parameter made, initialised and partitioned on its own; init_from
            # is then read into the partitions (longctx.train.zero3).
            partition_zero3(model, cfg, self.dist, self.grad_accum)
        init_note = ""
        if start.init_from and not start.init_sharded:
            init_note = self.init_weights(model, start.init_from)
        if self.dist.cp_size > 1:
            parallelize_model(
                model, self.dist.cp_group, cfg.parallel.cp_comm, cfg.parallel.ulysses_size,
                cfg.parallel.deterministic, s2_exchange=cfg.parallel.s2_exchange,
            )  # fmt: skip
        self.model = model
        if start.universal:
            self.convert_to_universal(start.resume_from)
        self.engine = build_engine(
            model, cfg, self.dist, load_universal=start.universal, grad_accum=self.grad_accum
        )
        if start.init_sharded:
            init_note = self.init_weights(model, start.init_from)
        self.checkpointer = Checkpointer(self.run_dir, cfg, self.dist)
        self.step = 0
        self.tokens = 0
        if start.resume_from is not None:
            self.resume(start.resume_from)
        unpin_mmap_threshold()
        if self.dist.is_main:
            # Resumed: records after the checkpoint; a torchrun restart before any checkpoint: all.
            kept_aside = keep_metrics_upto(self.run_dir, self.step)
            if kept_aside:
                history_note = f"metrics.jsonl records after step {self.step} moved to {kept_aside}"
        self.metrics = MetricsLogger(self.run_dir, cfg, cfg.train.steps, self.step, enabled=self.dist.is_main)
        self.metrics.write(
            f"model: {num_params / 1e6:.2f}M parameters, layers {cfg.model.pattern}, "
            f"seq_len {cfg.data.seq_len}, {self.data.train.num_tokens:,} training tokens in "
            f"{self.data.train.num_docs:,} documents, {self.data.val.num_tokens:,} validation tokens; "
            f"{self.dist.world_size} process(es): dp {self.dist.dp_size} x cp {self.dist.cp_size}, "
            f"engine {cfg.parallel.engine}, device {self.device}"
        )
        if start.resume_from is not None:
            how = " through DeepSpeed's universal checkpoint" if start.universal else ""
            self.metrics.write(f"resumed from {start.resume_from} at step {self.step}{how}")
            if self.step >= cfg.train.steps:
                self.metrics.write(
                    f"step {self.step} already reaches train.steps={cfg.train.steps}: nothing to train; "
                    "raise train.steps to continue, or start afresh in a new train.run_dir"
                )
        elif init_note:
            self.metrics.write(init_note)
        if history_note:
            self.metrics.write(history_note)
        zero3 = cfg.parallel.engine == "deepspeed" and cfg.parallel.zero_stage == 3
        if zero3 and self.dist.enabled and not start.zero_init:
            # Tied embeddings: built whole, then partitioned (docs/scale.md).
            gib = 4 * sum(torch.Size(shape).numel() for shape in self.param_shapes.values()) / 2**30
            self.metrics.write(
                f"DeepSpeed ZeRO-3 partitions the model after every rank built it whole in host memory "
                f"({gib:.2f} GiB fp32 a rank), as model.tie_embeddings=true shares one matrix under two names"
            )

    def lock_run_dir(self) -> None:
        """Rank 0: take the run directory's lock (ValueError naming the holder if another run has it)."""
        self.lock = RunLock.acquire(self.run_dir)

    def build_samplers(self, seq_len: int | None = None):
        """This data-parallel rank's training and validation samplers (`longctx.data.build_samplers`)."""
        cfg = self.cfg
        return build_samplers(
            cfg.data, self.data, self.tokenizer, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
            vocab_size=cfg.model.vocab_size, dp_rank=self.dist.dp_rank, dp_size=self.dist.dp_size,
            seq_len=seq_len,
        )  # fmt: skip

    def enter_stage(self, step: int) -> bool:
        """Make `self.sampler` the one of the `data.seq_len_schedule` stage that step `step` (from 0)
        falls in; True when that is a new stage. A stage's sampler starts at its own position 0, so
        the samples of a step depend on the step alone (a resumed run sees what it would have)."""
        stage = max(i for i, (start, _) in enumerate(self.stages) if start <= step)
        if stage == self.stage:
            return False
        start, mix = self.stage_mixes[stage]
        if len(mix) > 1:
            samplers = {n: self.build_samplers(n)[0] for n, _ in mix}
            schedule = LengthSchedule(mix, self.cfg.train.seed)
            self.sampler = MixedSampler(samplers, schedule, self.grad_accum)
        elif isinstance(self.sampler, MixedSampler) or mix[0][0] != self.sampler.seq_len:
            self.sampler, _ = self.build_samplers(mix[0][0])
        self.sampler.position = (step - start) * self.sampler.global_batch * self.grad_accum
        self.stage = stage
        return True

    def init_weights(self, model, path: str) -> str:
        """Load only the weights of `path` (a run, a checkpoint, an export or `hf:DIR`) into `model`,
        plain or FSDP2-sharded, each rank reading the rows it keeps: continue-training may change
        seq_len, RoPE scaling and the parallel layout."""
        from longctx.train.sharded_load import init_source, load_init_weights

        source = on_rank0(lambda: init_source(path), self.dist)
        return load_init_weights(model, source, self.param_shapes)

    def convert_to_universal(self, path: Path) -> None:
        """Convert DeepSpeed checkpoint `path` to the universal format (once, next to the original;
        rank 0 converts, the others wait), which loads at another DP x CP degree or ZeRO stage
        (`longctx.train.start.needs_universal` says when)."""
        deepspeed_universal(path, self.dist)

    def resume(self, path: Path) -> None:
        """Load checkpoint `path` (its parameters checked against the model's first) into the engine,
        and the step, token count, schedule stage and data position it was saved at."""
        saved = read_meta(path)["params"]
        check_weights(saved, self.param_shapes, f"checkpoint {str(path)!r}", RESUME_FIX)
        meta = self.checkpointer.load(path, self.engine)
        self.step, self.tokens = meta["step"], meta["tokens"]
        self.enter_stage(self.step)
        # Saved on the last step of the previous schedule stage: this stage starts at its own
        # position 0 (enter_stage), so the saved position has nothing left to say.
        if self.step != self.stages[self.stage][0]:
            self.sampler.load_state_dict(meta["sampler"])

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
        out["seq_len"] = batches[0].tokens.shape[1] - 1
        if docs_sum:
            out["docs_per_sample"] = docs_sum / samples
        if n_answers and self.cfg.train.loss_impl == "chunked":
            out.update(answer_loss=answer_loss / n_answers, answer_acc=right / n_answers)
        return out

    @torch.no_grad()
    def evaluate(self, sampler=None) -> float:
        """Mean next-token loss over the first `train.eval_batches` validation batches of every
        data-parallel rank (the same batches every time, so values at different steps compare), from
        `sampler` (default: the validation sampler at data.seq_len)."""
        sampler = sampler or self.val_sampler
        self.model.eval()
        loss_sum, count = 0.0, 0
        for index in range(self.cfg.train.eval_batches):
            batch = sampler.get_batch(index)
            docs = self.documents(batch.doc_starts)
            inputs, targets, layout = self.shard(batch.tokens.to(self.device), docs)
            with self.autocast():
                losses, _ = self.engine(inputs, layout, targets=targets)
            loss_sum, count = loss_sum + losses.sum().item(), count + targets.numel()
        self.model.train()
        total, n_tokens = all_reduce_sum([loss_sum, float(count)], self.dist)
        return total / n_tokens

    @torch.no_grad()
    def needle_check(self, length: int) -> float:
        """Exact-match needle accuracy at `length`: `train.eval_needle_samples` samples at each depth of
        `eval.depths` (`longctx.eval.niah`, the same samples every time), split over the data-parallel
        ranks and run context-parallel like training."""
        from longctx.eval.niah import NiahOptions, context_parallel_answer_logits, evaluate_niah

        info, kwargs = self.dist, {}
        if info.cp_size > 1:
            kwargs["forward"] = context_parallel_answer_logits(
                self.model, info.cp_rank, info.cp_size, info.cp_group
            )
        if info.enabled:
            # Every rank of a CP group sees the same hits; one of them counts.
            kwargs["reduce"] = lambda v: all_reduce_sum([x if info.cp_rank == 0 else 0.0 for x in v], info)
        with self.autocast():
            options = NiahOptions(
                lengths=[length],
                depths=self.cfg.eval.depths,
                samples=self.cfg.train.eval_needle_samples,
                n_digits=self.cfg.data.passkey_digits,
                batch_size=self.cfg.eval.batch_size,
                progress=False,
            )
            shard = (info.dp_rank, info.dp_size)
            results = evaluate_niah(
                self.model, self.tokenizer, self.data.train, options, shard=shard, **kwargs
            )
        return float(np.mean(results["accuracy"][0]))

    def evaluate_lengths(self) -> dict:
        """`val_loss` at data.seq_len, and `val_loss@L` and `needle@L` at every train.eval_lengths."""
        record = {}
        for length in self.cfg.eval_lengths():
            if length not in self.val_samplers:
                self.val_samplers[length] = self.build_samplers(length)[1]
            record[f"val_loss@{length}"] = self.evaluate(self.val_samplers[length])
            # Only a model taught retrieval (passkey samples in training) is asked for needles.
            if self.cfg.train.eval_needle_samples and self.cfg.data.passkey_fraction > 0:
                record[f"needle@{length}"] = self.needle_check(length)
        seq_len = self.cfg.data.seq_len
        return {"val_loss": record.get(f"val_loss@{seq_len}") or self.evaluate(), **record}

    def train(self) -> None:
        cfg = self.cfg.train
        self.model.train()
        start = time.perf_counter()
        window_t, window_tokens = start, self.tokens
        # Loss and tokens/s of each length, logged while a length mixture trains.
        meter = LengthMeter()
        while self.step < cfg.steps:
            lr = self.engine.lr
            if self.enter_stage(self.step) and len(self.stages) > 1:
                self.metrics.write(
                    f"step {self.step + 1}: seq_len {self.sampler.seq_len} "
                    f"(data.seq_len_schedule stage {self.stage + 1} of {len(self.stages)})"
                )
            step_start = time.perf_counter()
            out = self.train_step([self.sampler.next_batch() for _ in range(self.grad_accum)])
            if isinstance(self.sampler, MixedSampler) or meter:
                meter.add(out["seq_len"], out["loss"], out["tokens"], time.perf_counter() - step_start)
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
                record.update(meter.pop())
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                eval_start = time.perf_counter()
                record.update(self.evaluate_lengths())
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
