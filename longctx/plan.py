"""Per-GPU memory of a training config before launching it: `longctx plan`.

    longctx plan --config configs/llama3-8b-128k.yaml --gpus 8 --gpu-memory 80GiB [--seq-len 131072]
    longctx plan --config configs/llama3-70b-128k.yaml --gpus 64 --gpu-memory 80GiB

Adds up, per rank: fp32 master parameters, gradients and AdamW state (sharded as the engine shards
them), the bf16 parameters FSDP gathers, the activations saved for the backward per layer type under
the chosen checkpointing, the loss chunk, the context-parallel exchange buffers and a reserve; then
finds the longest sequence that fits and suggests `parallel.cp`, `parallel.dp_replicate`,
`train.activation_checkpointing` and `train.activation_offload` for the given GPUs.

The activation model counts, per token and layer, the tensors each block saves for the backward with
the Triton kernels (what runs on GPUs): a norm keeps its input, its fp32 1/rms, its normalised input and
the scaled result the projections keep; the SwiGLU MLP keeps four hidden-width tensors; D and S layers
keep q, k, v, the output and an fp32 log-sum-exp per head; N keeps its three branches' outputs and
log-sum-exps, gates, selected block ids and the block compressors' inputs; L keeps q, k, v, the gates,
fp64 cumulative decays and one `head_dim^2` state per head and chunk. `tests/test_plan.py` checks these
figures against the bytes autograd actually saves for tiny configs of every mixer (within 20%).
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

from longctx.config import Config, ModelConfig

GiB = 2**30
# Tokens per chunk of the L layers' kernel (kernels/gla): one state per head and chunk is saved.
GLA_CHUNK = 64
# The CUDA context, NCCL's buffers and allocator fragmentation: a fixed part and a share of the GPU.
RESERVE_FIXED, RESERVE_SHARE = 2 * GiB, 0.05


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '80G', '81920MiB' or a number of bytes."""
    units = {
        "": 1,
        "k": 1e3,
        "m": 1e6,
        "g": 1e9,
        "t": 1e12,
        "ki": 2**10,
        "mi": 2**20,
        "gi": 2**30,
        "ti": 2**40,
    }
    s = text.strip().lower().removesuffix("b")
    number = s.rstrip("kmgti")
    unit = s[len(number) :]
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise ValueError(f"--gpu-memory {text!r} is not a size; write e.g. 80GiB, 80GB or 141GiB") from None


def layer_bytes_per_token(cfg: ModelConfig, letter: str, mode: str, act: int = 2) -> dict:
    """Bytes a block of mixer `letter` saves for the backward per token, and the working set one
    block needs while it is recomputed: `{"saved": ..., "recompute": ...}`. `act` is the activation
    dtype's size (2 for bf16 on GPU, 4 for fp32)."""
    dim, hidden, d = cfg.dim, cfg.hidden_dim, cfg.head_dim
    heads, kv = cfg.n_heads, cfg.kv_heads
    # A norm: input, fp32 1/rms, normalised input, and the scaled output the projections keep.
    norm = 3 * act * dim + 4
    mlp = 4 * act * hidden
    if letter in "DS":
        mixer = act * (2 * heads * d + 2 * kv * d) + 4 * heads
    elif letter == "N":
        n = cfg.nsa
        compress = 2 * kv * d * (n.cmp_block + 8) / n.cmp_stride + 2 * kv * d / n.cmp_stride
        mixer = (
            act * (3 * heads + compress + 4 * heads * d + 2 * kv * d + dim)
            + 4 * 3 * heads
            + 4 * kv * n.slc_top
        )
    elif letter == "L":
        mixer = act * (3 * heads + 7 * heads * d + 2 * dim) + 8 * heads + 4 * heads * d * d / GLA_CHUNK
    else:
        raise ValueError(f"unknown mixer letter {letter!r}")
    whole = 2 * norm + mixer + mlp
    if mode == "none":
        return {"saved": whole, "recompute": 0.0}
    if mode == "selective":
        # The mixer half as is; the MLP half keeps only its input and is rebuilt in the backward.
        return {"saved": norm + mixer + act * dim, "recompute": norm + mlp}
    if mode == "full":
        return {"saved": act * dim, "recompute": whole}
    raise ValueError(f"activation checkpointing must be none, selective or full, got {mode!r}")


def measure_block_bytes(cfg: ModelConfig, letter: str, seq_len: int, mode: str = "none") -> int:
    """Bytes autograd saves for the backward of one block of mixer `letter` on `seq_len` tokens of
    one sequence (fp32, on CPU): distinct storages, parameters and the RoPE tables (shared by every
    layer) left out. Run with `TRITON_INTERPRET=1 LONGCTX_KERNEL_BACKEND=triton` to measure the
    Triton kernels (what GPUs run) rather than the PyTorch references."""
    import dataclasses

    import torch

    from longctx.model.rope import rope_cos_sin
    from longctx.model.transformer import Transformer
    from longctx.parallel.layout import SeqLayout

    model = Transformer(dataclasses.replace(cfg, layers=letter, n_layers=1))
    model.init_weights()
    model.activation_checkpointing = mode
    layout = SeqLayout.full(seq_len)
    cos, sin = rope_cos_sin(layout.positions(), model.rope_inv_freq, model.rope_mscale)
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), cos, sin)}
    x = torch.randn(1, seq_len, cfg.dim, requires_grad=True)
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    block = model.layers[0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if mode == "full":
            from torch.utils.checkpoint import checkpoint

            checkpoint(block, x, cos, sin, layout, use_reentrant=False)
        else:
            block(x, cos, sin, layout, selective=mode == "selective")
    return sum(storages.values())


def measure_recompute(cfg: ModelConfig, seq_len: int, mode: str, every_k: int = 2) -> dict:
    """What a checkpointing mode saves and what it costs, measured on the model `cfg` (fp32, CPU, the
    PyTorch reference kernels, whose matmuls the FLOP counter sees) for one sequence of `seq_len`
    tokens: `{"saved": bytes autograd keeps for the layer stack, "flops": FLOPs of forward +
    backward}` (`torch.utils.flop_counter`). Against mode "none", the bytes freed per recompute FLOP."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from longctx.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    model.activation_checkpointing, model.checkpoint_every_k = mode, every_k
    tokens = torch.randint(0, cfg.vocab_size, (1, seq_len))
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden = model(tokens, return_hidden=True)
        hidden.sum().backward()
    return {"saved": sum(storages.values()), "flops": counter.get_total_flops()}


def layer_modes(mode: str, n_layers: int, every_k: int) -> list[str]:
    """Each layer's checkpointing: `every_k` recomputes layers 0, k, 2k, ... whole and keeps the rest."""
    if mode != "every_k":
        return [mode] * n_layers
    return ["full" if i % every_k == 0 else "none" for i in range(n_layers)]


@dataclass
class Setup:
    gpus: int
    gpu_memory: int
    seq_len: int
    cp: int
    dp_replicate: int
    checkpointing: str
    offload: bool


def param_counts(cfg: ModelConfig) -> tuple[int, int, int]:
    """(all parameters, the largest block's, embedding + LM head) from the model built on meta."""
    import torch

    from longctx.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    block = max(sum(p.numel() for p in layer.parameters()) for layer in model.layers)
    root = total - sum(p.numel() for layer in model.layers for p in layer.parameters())
    return total, block, root


def breakdown(cfg: Config, setup: Setup, counts: tuple[int, int, int]) -> dict[str, float]:
    """Bytes per rank by component for `setup` (GPU: bf16 compute, fp32 master weights and AdamW)."""
    m, p = cfg.model, cfg.parallel
    total, block, root = counts
    world = setup.gpus
    shard = world // setup.dp_replicate
    sharded_params = p.engine == "deepspeed" and p.zero_stage == 3 or p.engine == "torch" and p.fsdp
    params_over = shard if sharded_params else 1
    grads_over = shard if sharded_params or (p.engine == "deepspeed" and p.zero_stage >= 2) else 1
    optim_over = shard if sharded_params or (p.engine == "deepspeed" and p.zero_stage >= 1) else 1
    out = {
        "parameters (fp32 master)": 4 * total / params_over,
        "gradients (fp32)": 4 * total / grads_over,
        "optimizer state (AdamW, fp32)": 8 * total / optim_over,
    }
    if sharded_params:
        # Two blocks' bf16 parameters gathered (one prefetched) and one block's fp32 gradient before its
        # reduce-scatter; the root (embedding, LM head) stays gathered through the step.
        out["gathered parameters (bf16)"] = 2 * 2 * block + 4 * block + 2 * root
    local = setup.seq_len // setup.cp * cfg.train.batch_size
    letters = m.pattern
    modes = layer_modes(setup.checkpointing, len(letters), cfg.train.checkpoint_every_k)
    for letter in sorted(set(letters), key="DSNL".index):
        saved = sum(
            layer_bytes_per_token(m, x, mode)["saved"] for x, mode in zip(letters, modes) if x == letter
        )
        count = letters.count(letter)
        out[f"activations: {count} x {letter} layers ({setup.checkpointing})"] = (
            0.0 if setup.offload else saved * local
        )
    if setup.checkpointing != "none":
        out["recompute working set (one block)"] = (
            max(layer_bytes_per_token(m, x, mode)["recompute"] for x, mode in zip(letters, modes)) * local
        )
    if setup.offload:
        saved = sum(layer_bytes_per_token(m, x, mode)["saved"] for x, mode in zip(letters, modes)) * local
        # What leaves for host memory, one block's worth is in flight at a time.
        out["offload staging (one block)"] = saved / len(letters)
    chunk = cfg.train.loss_chunk or max(1, 256 * 2**20 // (4 * m.vocab_size))
    # fp32 logits of a chunk and their softmax gradient; the final hidden states and their gradient.
    out["loss chunk"] = 2 * 4 * min(chunk, local) * m.vocab_size + (2 + 4) * local * m.dim
    out["embeddings, residual stream"] = 3 * 2 * local * m.dim
    if setup.cp > 1:
        kv_bytes = 2 * m.kv_heads * m.head_dim * local * 2  # bf16 k and v of the local tokens
        if p.cp_comm == "allgather" or "N" in letters:
            cp_buf = kv_bytes * setup.cp * 3  # the whole sequence's k, v and their fp32 gradients
        elif p.cp_comm == "ulysses":
            cp_buf = 2 * (m.n_heads + 2 * m.kv_heads) * m.head_dim * local * 2
        else:
            cp_buf = 2 * kv_bytes + 2 * 2 * kv_bytes  # ring: k, v in flight; dk, dv in fp32
        out[f"context-parallel buffers ({p.cp_comm})"] = cp_buf
    out["reserve (CUDA context, NCCL, fragmentation)"] = RESERVE_FIXED + RESERVE_SHARE * setup.gpu_memory
    return out


def fits(cfg: Config, setup: Setup, counts) -> bool:
    return sum(breakdown(cfg, setup, counts).values()) <= setup.gpu_memory


def longest_fitting(cfg: Config, setup: Setup, counts) -> int:
    """The longest sequence (a multiple of what CP sharding needs) that fits, or 0."""
    step = 2 * setup.cp * cfg.model.block_multiple()

    def ok(n):
        return fits(cfg, Setup(**{**setup.__dict__, "seq_len": n * step}), counts)

    if not ok(1):
        return 0
    hi = 1
    while ok(hi * 2) and hi < 2**30:
        hi *= 2
    lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo * step


def suggest(cfg: Config, setup: Setup, counts) -> Setup | None:
    """The cheapest setup that fits: the least recomputation (none, selective, full), then the fewest
    CP ranks (more data-parallel sequences a step), offload only if nothing else fits; FSDP/ZeRO-3
    shards within groups of 8 GPUs (a node; `dp_replicate` groups) when that still fits."""
    cps = [c for c in range(1, setup.gpus + 1) if setup.gpus % c == 0 and setup.seq_len % (2 * c) == 0]
    replicate = [setup.gpus // 8, 1] if setup.gpus > 8 and setup.gpus % 8 == 0 else [1]
    for mode, offload in [("none", False), ("selective", False), ("full", False), ("full", True)]:
        for cp in cps:
            for dp_replicate in replicate:
                candidate = Setup(
                    setup.gpus, setup.gpu_memory, setup.seq_len, cp, dp_replicate, mode, offload
                )
                if fits(cfg, candidate, counts):
                    return candidate
    return None


def host_offload_bytes(cfg: Config, setup: Setup) -> float:
    """Pinned host memory per GPU that `train.activation_offload` fills."""
    local = setup.seq_len // setup.cp * cfg.train.batch_size
    letters = cfg.model.pattern
    modes = layer_modes(setup.checkpointing, len(letters), cfg.train.checkpoint_every_k)
    return sum(layer_bytes_per_token(cfg.model, x, mode)["saved"] for x, mode in zip(letters, modes)) * local


def _gib(n: float) -> str:
    return f"{n / GiB:8.2f} GiB"


def report(cfg: Config, setup: Setup) -> str:
    counts = param_counts(cfg.model)
    parts = breakdown(cfg, setup, counts)
    total = sum(parts.values())
    engine = cfg.parallel.engine + (
        " FSDP2"
        if cfg.parallel.fsdp
        else f" ZeRO-{cfg.parallel.zero_stage}"
        if cfg.parallel.engine == "deepspeed"
        else " DDP"
    )
    dp = setup.gpus // setup.cp
    lines = [
        f"model: {counts[0] / 1e9:.2f}B parameters, {cfg.model.n_layers} layers {cfg.model.layers!r}, "
        f"vocab {cfg.model.vocab_size}",
        f"setup: {setup.gpus} GPUs x {setup.gpu_memory / GiB:.0f} GiB, seq_len {setup.seq_len}, "
        f"batch_size {cfg.train.batch_size}, cp {setup.cp} x dp {dp} (dp_replicate {setup.dp_replicate}), "
        f"{engine}, checkpointing {setup.checkpointing}, offload {str(setup.offload).lower()}",
        "",
        "per-GPU memory:",
    ]
    lines += [f"  {name:<48} {_gib(value)}" for name, value in parts.items()]
    lines.append(f"  {'total':<48} {_gib(total)}  of {setup.gpu_memory / GiB:.0f} GiB")
    if setup.offload:
        host = _gib(host_offload_bytes(cfg, setup)).strip()
        lines.append(f"  (pinned host memory per GPU for offloaded activations: {host})")
    verdict = "FITS" if total <= setup.gpu_memory else "DOES NOT FIT"
    lines.append(f"verdict: {verdict} ({100 * total / setup.gpu_memory:.0f}% of the GPU)")
    longest = longest_fitting(cfg, setup, counts)
    lines.append(f"longest sequence that fits this setup: {longest:,} tokens" if longest else
                 "no sequence length fits this setup")  # fmt: skip
    best = suggest(cfg, setup, counts)
    if best is None:
        lines.append("suggestion: nothing fits on these GPUs; add GPUs or shorten data.seq_len")
    else:
        used = sum(breakdown(cfg, best, counts).values())
        lines.append(
            f"suggestion: parallel.cp={best.cp} parallel.dp_replicate={best.dp_replicate} "
            f"train.activation_checkpointing={best.checkpointing} "
            f"train.activation_offload={str(best.offload).lower()} ({_gib(used).strip()} per GPU)"
        )
        if best.offload:
            lines.append(
                f"  offload needs {_gib(host_offload_bytes(cfg, best)).strip()} of pinned host memory per GPU"
            )
    return "\n".join(lines)


def _plan_config(path: str | None, overrides: list[str]) -> Config:
    """The config; a Hugging Face checkpoint not downloaded yet is read from configs/hf/NAME (its
    config.json, shipped for the configs here): the plan needs the architecture only."""
    import yaml

    from longctx.hf import load_config

    data = (yaml.safe_load(Path(path).read_text()) or {}) if path and Path(path).is_file() else {}
    given = dict(o.split("=", 1) for o in overrides if "=" in o)
    init = str(given.get("train.init_from") or (data.get("train") or {}).get("init_from") or "")
    if init.startswith("hf:") and not (Path(init[3:]) / "config.json").is_file():
        shipped = Path(__file__).resolve().parent.parent / "configs" / "hf" / Path(init[3:]).name
        if (shipped / "config.json").is_file():
            extra = [f"train.init_from=hf:{shipped}", "data.tokenizer=unused-by-plan"]
            return load_config(path, [*overrides, *extra])
    return load_config(path, overrides)


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=int, required=True, help="GPUs in all")
    p.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU (80GiB, 141GiB, ...)")
    p.add_argument("--seq-len", type=int, help="sequence length (default data.seq_len)")


def run_plan(
    config: str | None, overrides: list[str], gpus: int, gpu_memory: str, seq_len: int | None
) -> str:
    """The report `longctx plan` prints."""
    cfg = _plan_config(config, overrides)
    if gpus < 1 or gpus % cfg.parallel.cp:
        raise ValueError(f"--gpus {gpus} must be a positive multiple of parallel.cp={cfg.parallel.cp}")
    replicate = getattr(cfg.parallel, "dp_replicate", 1)
    if gpus % replicate:
        raise ValueError(f"parallel.dp_replicate={replicate} does not divide the {gpus} GPUs")
    seq_len = seq_len or cfg.data.seq_len
    if seq_len % (2 * cfg.parallel.cp):
        raise ValueError(f"--seq-len {seq_len} must split into 2 x parallel.cp={cfg.parallel.cp} chunks")
    setup = Setup(
        gpus=gpus,
        gpu_memory=parse_bytes(gpu_memory),
        seq_len=seq_len,
        cp=cfg.parallel.cp,
        dp_replicate=replicate,
        checkpointing=cfg.train.activation_checkpointing,
        offload=cfg.train.activation_offload,
    )
    return report(cfg, setup)
