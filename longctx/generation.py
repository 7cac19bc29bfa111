"""Text generation: prefill the prompt through the training kernels, then decode with per-mixer caches.

    out = longctx.generate(model, tokens, max_new_tokens=32)          # greedy
    out = longctx.generate(model, tokens, 32, temperature=0.8, top_p=0.95, seed=1)
    out.tokens, out.new_tokens, out.bytes_per_token                   # [B, T + n], [B, n], by mixer

    longctx generate --run runs/demo-continue --prompt "The pass key is 123. ... The pass key is"
    torchrun --nproc-per-node 2 -m longctx generate --run-dir RUN --prompt-file long.txt parallel.cp=2

Decoding is exact: greedy decoding's logits at every step equal the full forward pass's logits of the
same tokens (tests/test_generate.py). Caches are described in `longctx.model.decoding`.
"""

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from longctx.model.decoding import ModelCache, decode_step, prefill


@dataclass
class Generation:
    tokens: torch.Tensor  # [B, T + n] prompt then generated tokens
    new_tokens: torch.Tensor  # [B, n]
    logits: torch.Tensor | None  # [B, n, vocab] the logits each new token was drawn from, if asked
    prompt_len: int
    # Cache bytes per generated token by mixer letter, measured over the decode steps.
    bytes_per_token: dict[str, float] = field(default_factory=dict)
    cache_bytes: dict[str, int] = field(default_factory=dict)  # held at the end, by mixer letter
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """Next tokens `[B]` from logits `[B, vocab]`: argmax at temperature 0, else nucleus sampling over
    the smallest set of most likely tokens whose probability reaches `top_p`."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token while the mass before it is under top_p (the most likely one always).
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check(max_new_tokens, temperature, top_p):
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")


@torch.no_grad()
def generate(
    model,
    tokens,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
    return_logits: bool = False,
    prefill_fn=None,
) -> Generation:
    """Continue `tokens` by up to `max_new_tokens` tokens.

    Args:
        model: a `Transformer` (any mixer pattern with registered decoders).
        tokens: prompt `[B, T]` (or `[T]`, or a list of ids), T >= 1; the rows are continued together.
        max_new_tokens: tokens to add.
        temperature: 0 decodes greedily; above 0 samples from `softmax(logits / temperature)`.
        top_p: nucleus sampling mass (1: the whole distribution).
        seed: seeds the sampling generator, so a sampled continuation reproduces.
        eos_id: stop once every row has produced it (rows that ended keep emitting it).
        return_logits: also return every step's logits `[B, n, vocab]` (fp32).
        prefill_fn: `(model, tokens, cache) -> logits [B, vocab]` in place of `prefill`, e.g.
            `longctx.model.decoding.context_parallel_prefill(...)` under torchrun.
    """
    _check(max_new_tokens, temperature, top_p)
    device = next(model.parameters()).device
    tokens = torch.as_tensor(tokens, dtype=torch.long, device=device)
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"the prompt must be [B, T] token ids with T >= 1, got shape {tuple(tokens.shape)}")
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    cache = ModelCache.empty(model, tokens.shape[0])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    new, all_logits = [], []
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=device)
    try:
        start = time.perf_counter()
        with autocast:
            logits = (prefill_fn or prefill)(model, tokens, cache).float()
        prefill_seconds = time.perf_counter() - start
        after_prefill = cache.nbytes_by_mixer(model)
        start = time.perf_counter()
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_p, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            new.append(nxt)
            if return_logits:
                all_logits.append(logits)
            if i + 1 == max_new_tokens or (eos_id is not None and bool(done.all())):
                break
            with autocast:
                logits = decode_step(model, nxt, cache).float()
        decode_seconds = time.perf_counter() - start
    finally:
        model.train(was_training)
    held = cache.nbytes_by_mixer(model)
    steps = max(len(new) - 1, 0)  # decode steps run (the first new token came from the prefill)
    per_token = {k: (held[k] - after_prefill[k]) / steps if steps else 0.0 for k in held}
    new_tokens = torch.stack(new, 1) if new else tokens.new_zeros(tokens.shape[0], 0)
    return Generation(
        tokens=torch.cat([tokens, new_tokens], 1),
        new_tokens=new_tokens,
        logits=torch.stack(all_logits, 1) if return_logits and all_logits else None,
        prompt_len=tokens.shape[1],
        bytes_per_token=per_token,
        cache_bytes=held,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
    )


def add_generate_parser(sub) -> None:
    """Register `longctx generate` on the top-level CLI's subparsers."""
    p = sub.add_parser("generate", help="continue a prompt with a trained run's model")
    p.add_argument(
        "--run", "--run-dir", dest="run", required=True, help="run directory (config.yaml, tokenizer)"
    )
    p.add_argument("--checkpoint", help="weights (default: the run's exported or latest checkpoint)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", help="a text file holding the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--no-eos-stop", action="store_true", help="keep going past the end-of-text token")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for the model")
    p.set_defaults(func=cmd_generate)


def _context_parallel(model, cfg):
    """Under torchrun: every process prefills its share of the prompt (`parallel.cp` must be the
    number of processes), then each decodes the same continuation. One process: `(None, None)`."""
    from longctx.train.distributed import init_distributed, launched_distributed

    if not launched_distributed():
        return None, None
    from longctx.model.decoding import context_parallel_prefill
    from longctx.parallel import parallelize_model

    info = init_distributed(cfg)
    if info.dp_size != 1:
        raise ValueError(
            f"longctx generate under torchrun splits one prompt over the processes: set parallel.cp to the "
            f"number of processes ({info.dp_size * info.cp_size}), got parallel.cp={info.cp_size}"
        )
    model.to(info.device)
    parallelize_model(model, info.cp_group, cfg.parallel.cp_comm)
    return info, context_parallel_prefill(
        info.cp_rank, info.cp_size, info.cp_group, cfg.model.block_multiple()
    )


def cmd_generate(args) -> int:
    from longctx.weights import load_model_for_eval

    _check(args.max_new_tokens, args.temperature, args.top_p)
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {str(path)!r} not found")
        text = path.read_text()
    else:
        text = args.prompt
    model, cfg, tok = load_model_for_eval(args.run, args.checkpoint, args.overrides)
    ids = tok.encode(text)
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give some text")
    eos = None if args.no_eos_stop or tok.eos_id < 0 else tok.eos_id
    info, prefill_fn = _context_parallel(model, cfg)
    out = generate(
        model,
        ids,
        args.max_new_tokens,
        args.temperature,
        args.top_p,
        args.seed,
        eos_id=eos,
        prefill_fn=prefill_fn,
    )
    if info is not None:
        from longctx.train.distributed import shutdown

        shutdown()
        if not info.is_main:
            return 0
    new = [t for t in out.new_tokens[0].tolist() if t != eos]
    print(tok.decode(new))
    n = out.new_tokens.shape[1]
    memory = ", ".join(f"{k} {v / 1024:.2f} KiB" for k, v in sorted(out.bytes_per_token.items()))
    print(
        f"[{len(ids)} prompt tokens in {out.prefill_seconds:.2f}s; {n} new tokens in "
        f"{out.decode_seconds:.2f}s; cache growth per generated token by mixer: {memory}]",
        file=sys.stderr,
    )
    return 0
