"""Whole-model training throughput and memory by context length, dense against hybrid, on one GPU.

    longctx bench train                                         # dim 2048, 16 layers, T 4k..128k
    python -m longctx.bench.train --layers D LLLSLLLNLLLD --seqlens 8192 32768 --max-search

For each layer pattern (same width, depth and heads: only the mixers differ) and context length it
times full optimizer steps (forward, backward, AdamW; bf16 autocast, fp32 master weights, activation
checkpointing on) on random tokens, batch 1, and records tokens/s and peak GPU memory. With
`--max-search` it also doubles the length until a step runs out of memory: the longest context each
pattern trains at on this GPU. Without CUDA it prints why and exits 0.
"""

import argparse
import sys
import time

import torch

from longctx.bench.common import require_cuda, write_results

BENCH = "train"


def _step_fn(model, optimizer, tokens):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(model_overrides: list[str], seq_len: int, steps: int = 5) -> dict:
    from longctx.config import load_config
    from longctx.model import build_model

    cfg = load_config(None, [*model_overrides, f"data.seq_len={seq_len}"]).model
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build_model(cfg, "cuda")
    model.activation_checkpointing = True
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, cfg.vocab_size, (1, seq_len + 1), device="cuda")
    step = _step_fn(model, optimizer, tokens)
    step()  # warm-up: autotuning, allocator
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    record = dict(
        layers=cfg.pattern, params_m=round(model.num_params() / 1e6, 1), T=seq_len,
        step_ms=round(seconds * 1e3, 2), tokens_per_s=round(seq_len / seconds, 1),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
    )  # fmt: skip
    del model, optimizer
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="longctx bench train", description=__doc__.split("\n")[0])
    parser.add_argument("--layers", nargs="+", default=["D", "LLLSLLLNLLLD"])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--max-search", action="store_true", help="also find the longest trainable context")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", help="results JSON (default bench/results/<device>-<date>.json)")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="model overrides (default model.dim=2048 model.n_layers=16 model.n_heads=16)",
    )
    args = parser.parse_args(argv)
    if not require_cuda(BENCH):
        return 0
    base = [
        "model.dim=2048",
        "model.n_layers=16",
        "model.n_heads=16",
        "model.n_kv_heads=4",
        "model.vocab_size=32000",
    ]
    base += args.overrides
    records = []
    for layers in args.layers:
        overrides = [*base, f"model.layers={layers}"]
        longest = 0
        for t in args.seqlens:
            try:
                rec = measure(overrides, t, args.steps)
            except torch.OutOfMemoryError:
                print(f"{layers} T={t}: out of memory")
                records.append(dict(bench=BENCH, layers=layers, T=t, oom=True))
                break
            longest = t
            records.append(dict(bench=BENCH, **rec))
            print(
                f"{layers:>14} T={t:>7}: {rec['tokens_per_s']:>10,.0f} tok/s  peak {rec['peak_gib']:6.2f} GiB"
            )
        if args.max_search and longest:
            t = longest * 2
            while True:
                try:
                    measure(overrides, t, steps=1)
                except torch.OutOfMemoryError:
                    break
                longest, t = t, t * 2
            records.append(dict(bench=BENCH, layers=layers, max_T=longest))
            print(f"{layers:>14}: longest context trained {longest:,} tokens")
    print(f"wrote {write_results(BENCH, records, path=args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
