"""Run configuration: one dataclass per section, loaded from YAML plus `key.sub=value` overrides.

    cfg = load_config("configs/tiny.yaml", ["model.layers=DSNL", "train.steps=30"])

Every key is checked: an unknown key names the nearest valid one, a wrong type names the expected
type, and each section validates its values in `__post_init__`. `save_config` writes the resolved
config that a run directory keeps.
"""

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

MIXER_LETTERS = "DSNLG"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which key and how to fix it."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass
class RopeScalingConfig:
    type: Literal["none", "linear", "ntk", "yarn", "llama3"] = "none"
    factor: float = 1.0
    # Context length the model was trained at before scaling (used by `yarn` and `llama3`).
    original_max_len: int = 2048
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    # `llama3` (Llama 3.1's scaling): wavelengths longer than original_max_len / low_freq_factor are
    # interpolated, shorter than original_max_len / high_freq_factor kept, the band between blended.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self):
        _require(self.factor >= 1.0, "model.rope.scaling.factor", f"must be >= 1, got {self.factor}")
        _require(self.original_max_len > 0, "model.rope.scaling.original_max_len", "must be positive")
        _require(
            self.beta_fast > self.beta_slow > 0,
            "model.rope.scaling.beta_fast",
            f"need beta_fast > beta_slow > 0, got {self.beta_fast} and {self.beta_slow}",
        )
        _require(
            self.high_freq_factor > self.low_freq_factor > 0,
            "model.rope.scaling.high_freq_factor",
            f"need high_freq_factor > low_freq_factor > 0, got {self.high_freq_factor} and "
            f"{self.low_freq_factor}",
        )


@dataclass
class RopeConfig:
    theta: float = 10000.0
    scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)

    def __post_init__(self):
        _require(self.theta > 1.0, "model.rope.theta", f"must be > 1, got {self.theta}")


@dataclass
class S2Config:
    block_size: int = 64
    local_blocks: int = 8
    vert_stride: int = 16
    dense_heads: int = 0

    def __post_init__(self):
        for name in ("block_size", "local_blocks", "vert_stride"):
            _require(getattr(self, name) >= 1, f"model.s2.{name}", f"must be >= 1, got {getattr(self, name)}")
        _require(self.dense_heads >= 0, "model.s2.dense_heads", f"must be >= 0, got {self.dense_heads}")


@dataclass
class NSAConfig:
    cmp_block: int = 32
    cmp_stride: int = 16
    slc_block: int = 64
    slc_top: int = 16
    window: int = 512

    def __post_init__(self):
        _require(self.cmp_stride >= 1, "model.nsa.cmp_stride", f"must be >= 1, got {self.cmp_stride}")
        _require(
            self.cmp_block >= self.cmp_stride and self.cmp_block % self.cmp_stride == 0,
            "model.nsa.cmp_block",
            f"must be a multiple of cmp_stride ({self.cmp_stride}), got {self.cmp_block}",
        )
        _require(
            self.slc_block % self.cmp_stride == 0,
            "model.nsa.slc_block",
            f"must be a multiple of cmp_stride ({self.cmp_stride}), got {self.slc_block}",
        )
        _require(
            self.slc_top >= 3,
            "model.nsa.slc_top",
            f"must be >= 3 (block 0 and the two local blocks are always selected), got {self.slc_top}",
        )
        _require(self.window >= 1, "model.nsa.window", f"must be >= 1, got {self.window}")


@dataclass
class LinearConfig:
    # g_t = logsigmoid(x w_g) / gate_temp: a larger temperature keeps decays closer to 1.
    gate_temp: float = 16.0

    def __post_init__(self):
        _require(self.gate_temp > 0, "model.linear.gate_temp", f"must be > 0, got {self.gate_temp}")


@dataclass
class ModelConfig:
    # 8192 fits the builtin corpus (SentencePiece can fill at most ~15,800 pieces from it).
    vocab_size: int = 8192
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    # None: as many kv heads as query heads.
    n_kv_heads: int | None = None
    # Mixer letters tiled to n_layers: D dense, S S2 sparse, N native sparse, L gated linear,
    # G gated delta rule.
    layers: str = "D"
    mlp_ratio: float = 8 / 3
    # Overrides mlp_ratio when set (imported checkpoints give it exactly).
    mlp_hidden: int | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    init_std: float = 0.02
    # Sliding window of D layers (None: full causal).
    dense_window: int | None = None
    rope: RopeConfig = field(default_factory=RopeConfig)
    s2: S2Config = field(default_factory=S2Config)
    nsa: NSAConfig = field(default_factory=NSAConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads"):
            _require(getattr(self, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(self, name)}")
        _require(
            self.dim % self.n_heads == 0,
            "model.dim",
            f"{self.dim} does not divide into n_heads={self.n_heads}; pick a multiple of {self.n_heads}",
        )
        _require(self.head_dim % 2 == 0, "model.dim", f"head dim {self.head_dim} must be even for RoPE")
        _require(
            self.n_heads % self.kv_heads == 0,
            "model.n_kv_heads",
            f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.kv_heads}",
        )
        _require(len(self.layers) > 0, "model.layers", f"must be a non-empty string over {MIXER_LETTERS}")
        for letter in self.layers:
            _require(
                letter in MIXER_LETTERS,
                "model.layers",
                f"unknown mixer letter {letter!r} in {self.layers!r}; use D (dense), S (S2 sparse), "
                "N (native sparse), L (gated linear) or G (gated delta rule)",
            )
        _require(
            self.s2.dense_heads <= self.n_heads,
            "model.s2.dense_heads",
            f"{self.s2.dense_heads} exceeds n_heads={self.n_heads}",
        )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def pattern(self) -> str:
        """The layer letters tiled to n_layers ("LLLS" with 8 layers gives "LLLSLLLS")."""
        return (self.layers * self.n_layers)[: self.n_layers]

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return -(-int(self.mlp_ratio * self.dim) // 32) * 32

    def block_multiple(self) -> int:
        """Tokens every context-parallel chunk must be a multiple of (the largest block used)."""
        used = set(self.pattern)
        sizes = [1]
        if "S" in used:
            sizes.append(self.s2.block_size)
        if "N" in used:
            sizes.append(self.nsa.slc_block)
        out = 1
        for s in sizes:
            out = out * s // _gcd(out, s)
        return out


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


@dataclass
class DataConfig:
    # builtin | a local file or folder (txt, json, jsonl, parquet) | hf:NAME[:SPLIT]
    source: str = "builtin"
    # Path of a sentencepiece .model; empty: train one on the corpus (cached).
    tokenizer: str = ""
    seq_len: int = 512
    passkey_fraction: float = 0.0
    cache_dir: str = ".cache/longctx"
    text_field: str = "text"
    val_fraction: float = 0.05
    # Digits of the passkey in passkey samples (one token each).
    passkey_digits: int = 5
    # A passkey training sample takes a uniform share in [passkey_min_share, 1] of its sequence, at a
    # random offset, the rest corpus text, so its answer lands at varying positions (1.0: the whole
    # sequence, the answer always at its end; docs/context-extension.md).
    passkey_min_share: float = 0.25
    # Tokenizer threads for `data prepare`; 0: every core this process may use.
    num_workers: int = 0
    # Shorter contexts first: stages "LENxSTEPS" (train LEN tokens for STEPS steps), in order, then
    # data.seq_len for the remaining steps. E.g. ["128x300", "256x300"]. Empty: data.seq_len throughout.
    seq_len_schedule: list[str] = field(default_factory=list)
    # A mixture of lengths "LEN:SHARE" for the steps after the schedule (in place of data.seq_len),
    # e.g. ["256:0.3", "512:0.7"]: each step trains one length, the shares holding over every window
    # of steps (longctx.data.mixture). A schedule stage takes one as "256:0.3+512:0.7x300".
    seq_len_mix: list[str] = field(default_factory=list)
    # Train on a corpus shorter than one sample (seq_len + 1 tokens) by repeating it within each
    # sample (a warning gives the repetition factor); off: such a corpus is an error.
    allow_repeat: bool = False
    # Packed documents stay apart: every mixer attends (or carries state) only within a token's own
    # document, in training and evaluation (docs/documents.md). false: attend across documents.
    doc_mask: bool = True
    # RoPE positions: `global` (the position in the packed sequence) or `per_doc` (from the document start).
    doc_positions: Literal["global", "per_doc"] = "global"

    def __post_init__(self):
        _require(self.seq_len >= 2, "data.seq_len", f"must be >= 2, got {self.seq_len}")
        _require(
            0.0 <= self.passkey_fraction <= 1.0,
            "data.passkey_fraction",
            f"must be in [0, 1], got {self.passkey_fraction}",
        )
        _require(
            0.0 <= self.val_fraction < 1.0, "data.val_fraction", f"must be in [0, 1), got {self.val_fraction}"
        )
        _require(
            0.0 < self.passkey_min_share <= 1.0,
            "data.passkey_min_share",
            f"must be in (0, 1] (1.0: passkey samples fill the sequence), got {self.passkey_min_share}",
        )
        _require(
            1 <= self.passkey_digits <= 18,
            "data.passkey_digits",
            f"must be in [1, 18] (the key is a 64-bit integer), got {self.passkey_digits}",
        )
        _require(
            self.num_workers >= 0, "data.num_workers", f"must be >= 0 (0: all cores), got {self.num_workers}"
        )
        _require(
            self.text_field != "", "data.text_field", "must name the JSON/Parquet field that holds the text"
        )
        self.stages()  # validates data.seq_len_schedule

    def stages(self) -> list[tuple[int, int]]:
        """`(first step, seq_len)` of every stage of `seq_len_schedule`, then `(k, data.seq_len)`;
        steps count from 0. A stage with a length mixture gives its longest length."""
        return [(start, max(n for n, _ in mix)) for start, mix in self.stage_mixes()]

    def stage_mixes(self) -> list[tuple[int, list[tuple[int, float]]]]:
        """`(first step, [(seq_len, share), ...])` of every stage: those of `seq_len_schedule`, then
        `data.seq_len_mix` (or `data.seq_len` alone) for the remaining steps."""
        stages, start = [], 0
        for i, entry in enumerate(self.seq_len_schedule):
            key = f"data.seq_len_schedule[{i}]"
            lengths, sep, steps = str(entry).rpartition("x")
            try:
                steps = int(steps)
            except ValueError:
                steps = 0
            _require(
                sep == "x" and steps >= 1,
                key,
                f"must be 'LENxSTEPS' (train LEN tokens for STEPS steps), e.g. '128x300', or a mixture "
                f"'LEN:SHARE+LEN:SHARExSTEPS', e.g. '128:0.5+256:0.5x300'; got {entry!r}",
            )
            mix = _parse_mix(lengths.split("+") if ":" in lengths else [f"{lengths}:1"], key)
            for length, _ in mix:
                _require(
                    length <= self.seq_len,
                    key,
                    f"length {length} exceeds data.seq_len={self.seq_len}, the length the schedule ends at",
                )
            stages.append((start, mix))
            start += steps
        final = (
            _parse_mix(self.seq_len_mix, "data.seq_len_mix") if self.seq_len_mix else [(self.seq_len, 1.0)]
        )
        _require(
            max(n for n, _ in final) <= self.seq_len,
            "data.seq_len_mix",
            f"length {max(n for n, _ in final)} exceeds data.seq_len={self.seq_len}, the longest length "
            "the run trains at (what model and evaluation defaults are sized for); raise data.seq_len",
        )
        stages.append((start, final))
        return stages


def _parse_mix(entries: list[str], key: str) -> list[tuple[int, float]]:
    """`["256:0.3", "512:0.7"]` -> `[(256, 0.3), (512, 0.7)]`, checked: lengths >= 2 and distinct,
    shares positive and summing to 1."""
    mix = []
    for entry in entries:
        length, sep, share = str(entry).partition(":")
        try:
            length, share = int(length), float(share)
        except ValueError:
            length, share = 0, 0.0
        _require(
            sep == ":" and length >= 2 and share > 0,
            key,
            f"each entry must be 'LEN:SHARE' (a length of at least 2 tokens and a positive share of the "
            f"samples), e.g. '256:0.3'; got {entry!r}",
        )
        mix.append((length, share))
    lengths = [n for n, _ in mix]
    _require(len(set(lengths)) == len(lengths), key, f"lists a length twice: {lengths}")
    total = sum(share for _, share in mix)
    _require(
        abs(total - 1.0) < 1e-6,
        key,
        f"the shares must sum to 1, got {total:g} ({entries}); e.g. ['256:0.3', '512:0.7']",
    )
    return mix


@dataclass
class TrainConfig:
    steps: int = 100
    # Sequences per step on each data-parallel rank.
    batch_size: int = 8
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # Loss weight of the answer digits of passkey samples (1.0: plain next-token loss). A larger
    # weight makes small models learn retrieval sooner; the reported `loss` stays the plain mean.
    answer_loss_weight: float = 1.0
    seed: int = 0
    run_dir: str = "runs/default"
    log_every: int = 1
    eval_every: int = 0
    eval_batches: int = 4
    # Lengths the eval_every evaluation runs at (validation loss and a needle check, logged as
    # val_loss@L and needle@L); empty: the pretraining length (model.rope.scaling.original_max_len,
    # when the RoPE is scaled) and data.seq_len.
    eval_lengths: list[int] = field(default_factory=list)
    # Needle samples per depth (eval.depths) of that check, made when data.passkey_fraction > 0; 0: none.
    eval_needle_samples: int = 2
    # Save a checkpoint every this many steps, and always at the last step (0: only at the last step).
    ckpt_every: int = 0
    # Complete checkpoints kept (0: all).
    keep_last: int = 2
    # auto: the latest complete checkpoint of run_dir if any | none | a checkpoint path
    resume: str = "auto"
    # With train.resume=none: replace the run already in run_dir (its checkpoints and metrics.jsonl);
    # without it, starting afresh over an earlier run is an error.
    overwrite: bool = False
    # Load weights only (continue-training) from this checkpoint or run directory, or from a Hugging
    # Face Llama/Mistral/Qwen2 folder `hf:DIR` (which also sets the model's architecture and tokenizer).
    init_from: str = ""
    # Write torch-engine checkpoints on a background thread while training goes on.
    async_ckpt: bool = False
    # none | full (recompute every block in the backward) | selective (recompute the MLPs and their
    # norms, keep the mixers' saved tensors) | every_k (recompute every checkpoint_every_k-th block
    # whole, from the first); true/false of older configs mean full/none.
    activation_checkpointing: bool | Literal["none", "full", "selective", "every_k"] = "none"
    checkpoint_every_k: int = 2
    # Keep what the backward needs in pinned host memory (torch.autograd.graph.save_on_cpu).
    activation_offload: bool = False
    # Tokens per chunk of the LM head + cross-entropy (0: a chunk's fp32 logits are ~256 MiB).
    loss_chunk: int = 0
    # chunked (longctx.model.loss, any device) | liger (Liger Kernel's fused kernel, CUDA only).
    loss_impl: Literal["chunked", "liger"] = "chunked"
    # Micro-batches of train.batch_size per optimizer step (gradients sync on the last only).
    grad_accum: int = 1
    # Tokens per optimizer step over all data-parallel ranks (0: unset); sets grad_accum from
    # batch_size x data.seq_len x the data-parallel size, which must divide it.
    global_batch_tokens: int = 0
    wandb: bool = True
    wandb_mode: Literal["offline", "online"] = "offline"
    wandb_project: str = "longctx"
    progress: bool = True
    # Attention kernels: auto (Triton where it runs, the reference elsewhere; an op `longctx check`
    # failed on this GPU runs on flex / the reference) | triton | flex (D and S on FlexAttention).
    kernels: Literal["auto", "triton", "flex"] = "auto"

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every", "eval_batches"):
            _require(getattr(self, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "ckpt_every", "keep_last", "eval_needle_samples"):
            _require(getattr(self, name) >= 0, f"train.{name}", f"must be >= 0, got {getattr(self, name)}")
        _require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _require(
            all(n >= 2 for n in self.eval_lengths),
            "train.eval_lengths",
            f"must be lengths of at least 2 tokens, got {self.eval_lengths}",
        )
        _require(
            0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}"
        )
        _require(
            self.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (0 turns it off), got {self.grad_clip}"
        )
        _require(
            self.answer_loss_weight >= 0,
            "train.answer_loss_weight",
            f"must be >= 0 (1.0: plain loss), got {self.answer_loss_weight}",
        )
        if isinstance(self.activation_checkpointing, bool):
            self.activation_checkpointing = "full" if self.activation_checkpointing else "none"
        for name in ("loss_chunk", "global_batch_tokens"):
            value = getattr(self, name)
            _require(value >= 0, f"train.{name}", f"must be >= 0 (0: automatic), got {value}")
        _require(self.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _require(
            self.checkpoint_every_k >= 1,
            "train.checkpoint_every_k",
            f"must be >= 1 (1: every block, as activation_checkpointing=full), got {self.checkpoint_every_k}",
        )
        _require(
            self.loss_impl == "chunked" or self.answer_loss_weight == 1.0,
            "train.loss_impl",
            "liger's fused loss cannot weight single tokens; use train.loss_impl=chunked with "
            f"train.answer_loss_weight={self.answer_loss_weight}",
        )
        _require(
            self.resume != "",
            "train.resume",
            "must be auto (the latest checkpoint of run_dir), none, or a checkpoint path",
        )
        _require(
            not self.overwrite or self.resume == "none",
            "train.overwrite",
            f"replaces the run in run_dir, so it needs train.resume=none (got train.resume={self.resume})",
        )

    def accum_steps(self, seq_len: int, dp_size: int) -> int:
        """Micro-batches per optimizer step: train.grad_accum, or derived from global_batch_tokens."""
        if not self.global_batch_tokens:
            return self.grad_accum
        micro = self.batch_size * seq_len * dp_size
        steps = self.global_batch_tokens // micro
        if steps * micro != self.global_batch_tokens:
            near = [micro * max(1, steps), micro * (steps + 1)]
            raise ConfigError(
                f"train.global_batch_tokens: {self.global_batch_tokens} is not a whole number of "
                f"micro-batches of {micro} tokens (train.batch_size={self.batch_size} x data.seq_len="
                f"{seq_len} x {dp_size} data-parallel ranks); use e.g. {near[0]} or {near[1]}, or set "
                "train.grad_accum"
            )
        if self.grad_accum not in (1, steps):
            raise ConfigError(
                f"train.grad_accum={self.grad_accum} contradicts train.global_batch_tokens="
                f"{self.global_batch_tokens}, which gives {steps} micro-batches; set only one of them"
            )
        return steps


@dataclass
class ParallelConfig:
    cp: int = 1
    # How D layers exchange keys/values (S, N and L layers have their own schemes).
    cp_comm: Literal["ring", "ulysses", "allgather", "usp"] = "ring"
    # usp: all-to-all over heads within groups of this many consecutive CP ranks, ring across groups.
    ulysses_size: int = 1
    engine: Literal["torch", "deepspeed"] = "torch"
    zero_stage: int = 1
    fsdp: bool = False
    # A user's own DeepSpeed JSON; empty: generated from this config.
    deepspeed_config: str = ""
    # Process-group backend: auto picks nccl with CUDA, gloo without.
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # How long ranks wait for each other (rendezvous, collectives) before failing.
    timeout_s: int = 600
    # HSDP: FSDP2 / ZeRO-3 shard within groups of (DP x CP) / dp_replicate ranks and replicate across
    # the groups (a 2D mesh; DeepSpeed's zero_hpz_partition_size), so parameter gathers stay in a node.
    dp_replicate: int = 1
    # Every context-parallel reduction in a fixed order without atomics, and kernel backwards without
    # atomics (the same gradients to the last bit on every run). S and N layers always reduce this way
    # (docs/parallelism.md).
    deterministic: bool = False
    # S layers under CP: fetch peer by peer (memory ~1/P) or every needed block at once; auto picks the
    # one holding fewer bytes, from the cached plan (docs/parallelism.md).
    s2_exchange: Literal["auto", "peer", "oneshot"] = "auto"

    def __post_init__(self):
        _require(self.cp >= 1, "parallel.cp", f"must be >= 1, got {self.cp}")
        _require(
            self.cp_comm != "usp" or (self.ulysses_size >= 1 and self.cp % self.ulysses_size == 0),
            "parallel.ulysses_size",
            f"{self.ulysses_size} must divide parallel.cp={self.cp} under parallel.cp_comm=usp "
            "(cp = ulysses_size x ring size)",
        )
        _require(
            self.ulysses_size == 1 or self.cp_comm == "usp",
            "parallel.ulysses_size",
            f"{self.ulysses_size} is only used with parallel.cp_comm=usp (got cp_comm={self.cp_comm})",
        )
        _require(
            self.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", f"must be 0-3, got {self.zero_stage}"
        )
        _require(self.timeout_s >= 1, "parallel.timeout_s", f"must be >= 1, got {self.timeout_s}")
        _require(self.dp_replicate >= 1, "parallel.dp_replicate", f"must be >= 1, got {self.dp_replicate}")
        _require(
            self.dp_replicate == 1 or self.fsdp or (self.engine == "deepspeed" and self.zero_stage == 3),
            "parallel.dp_replicate",
            f"{self.dp_replicate} replicates sharded parameters; it needs parallel.fsdp=true (torch) or "
            "parallel.engine=deepspeed with parallel.zero_stage=3",
        )
        _require(
            not (self.fsdp and self.engine == "deepspeed"),
            "parallel.fsdp",
            "FSDP2 belongs to the torch engine; with parallel.engine=deepspeed use parallel.zero_stage=3",
        )


@dataclass
class EvalConfig:
    batch_size: int = 1
    lengths: list[int] = field(default_factory=lambda: [512])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples: int = 10

    def __post_init__(self):
        _require(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(
            all(0.0 <= d <= 1.0 for d in self.depths), "eval.depths", f"must lie in [0, 1], got {self.depths}"
        )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        multiple = 2 * self.parallel.cp * self.model.block_multiple()
        # One process runs any length; sharding needs whole blocks in each of the 2 * cp chunks.
        mixes = self.data.stage_mixes()
        lengths = [("data.seq_len", self.data.seq_len)] + [
            (f"data.seq_len_schedule[{i}]", n) for i, (_, mix) in enumerate(mixes[:-1]) for n, _ in mix
        ]
        lengths += [("data.seq_len_mix", n) for n, _ in mixes[-1][1]] if self.data.seq_len_mix else []
        lengths += [("train.eval_lengths", n) for n in self.eval_lengths()] if self.train.eval_every else []
        for key, seq_len in lengths:
            if self.parallel.cp > 1 and seq_len % multiple:
                working = [multiple * n for n in range(1, 5)]
                near = max(multiple, seq_len // multiple * multiple)
                raise ConfigError(
                    f"{key}: {seq_len} does not split into {2 * self.parallel.cp} zigzag "
                    f"chunks of whole {self.model.block_multiple()}-token blocks (parallel.cp="
                    f"{self.parallel.cp}, layers {self.model.pattern!r}); it must be a multiple of "
                    f"{multiple}, e.g. {near} or one of {working}"
                )

    def eval_lengths(self) -> list[int]:
        """`train.eval_lengths`, or by default the pretraining length (the RoPE scaling's
        original_max_len, when scaled) and data.seq_len."""
        if self.train.eval_lengths:
            return list(self.train.eval_lengths)
        scaling = self.model.rope.scaling
        pretrained = [scaling.original_max_len] if scaling.type != "none" else []
        return sorted({*pretrained, self.data.seq_len})


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str):
    """Check (and gently convert) `value` to type `tp`; raise ConfigError naming `key` if it can't."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            (inner,) = typing.get_args(tp)
            return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls, data, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            candidates = {f"{prefix}{n}": n for n in names}
            near = difflib.get_close_matches(full, list(candidates), n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys here: {', '.join(names)}"
            raise ConfigError(f"unknown config key {full!r}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from e


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, object]]:
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value (e.g. train.steps=30)")
        key, raw = item.split("=", 1)
        pairs.append((key.strip(), yaml.safe_load(raw) if raw.strip() else ""))
    return pairs


def config_from_dict(data: dict, overrides: list[str] = ()) -> Config:
    """A `Config` from a config file's dict and `key.sub=value` overrides. `train.init_from=hf:DIR` is
    resolved before this, by `longctx.hf.load_config` (the command line's loader)."""
    tree = copy.deepcopy(dict(data or {}))
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    return _build(Config, tree, "")


def read_config_file(path: str | Path | None) -> dict:
    """A YAML config file's contents as a dict (empty when `path` is None: the defaults)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; the ones shipped are in configs/")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from e


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or start from defaults when `path` is None) and apply overrides."""
    return config_from_dict(read_config_file(path), overrides)


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
