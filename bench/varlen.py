"""Packed documents (varlen): dense flash attention over one long sequence of many documents, with
document masking, against one full causal call over the same tokens.

    longctx bench kernels --only varlen
    python -m longctx.bench.varlen --tokens 131072 --mean 4096 [--head-dim 128] [--out FILE]

Document lengths are drawn from a long-tailed (log-normal, sigma 1) distribution with the given mean
and packed into `--tokens` tokens (the last one cut to fit). With document masking the kernel skips
every key tile outside a query tile's document, so its work follows `sum(L_i^2)`, not `T^2`: the
ideal time ratio to a full causal call is `sum(L_i^2) / T^2`. Reported per pass: both times, the
measured ratio, the ideal one, and measured / ideal (the target on a GPU is <= 1.3; tile edges and
the per-tile launch cost make it larger for very short documents).

On a GPU it times the Triton kernels with `triton.testing.do_bench`. Without CUDA it still runs, on a
small case (`--tokens 4096 --mean 256` unless given) through the reference path, timed with
`time.perf_counter`: a check that the case works, not a performance number.
"""

import argparse
import sys
import time

import numpy as np
import torch

from longctx.bench.common import do_bench, write_results

BENCH = "varlen"
PASSES = ("fwd", "fwd+bwd")


def document_lengths(tokens: int, mean: float, seed: int = 0) -> list[int]:
    """Log-normal lengths (sigma 1, the given mean, at least 1) packed into `tokens`."""
    rng = np.random.default_rng(seed)
    sigma = 1.0
    mu = np.log(mean) - sigma**2 / 2
    lengths, total = [], 0
    while total < tokens:
        n = max(1, int(rng.lognormal(mu, sigma)))
        n = min(n, tokens - total)
        lengths.append(n)
        total += n
    return lengths


def cu_seqlens_of(lengths: list[int]) -> torch.Tensor:
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return torch.tensor(np.concatenate([offsets, [sum(lengths)]]), dtype=torch.int32)[None]


def _timer(gpu: bool):
    if gpu:
        return do_bench

    def wall(fn) -> float:
        fn()  # warm-up
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return wall


def run(tokens: int, mean: float, heads: int, head_dim: int, seed: int = 0) -> list[dict]:
    from longctx.kernels import flash_attn

    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    lengths = document_lengths(tokens, mean, seed)
    cu = cu_seqlens_of(lengths).to(device)
    torch.manual_seed(seed)
    q, k, v = (torch.randn(1, tokens, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))  # fmt: skip
    do = torch.randn_like(q)
    ideal = float(sum(n * n for n in lengths)) / float(tokens) ** 2
    timer = _timer(gpu)
    records = []
    for mode in PASSES:
        times = {}
        for impl, kwargs in (("varlen", {"cu_seqlens": cu}), ("full_causal", {})):

            def step(kwargs=kwargs, mode=mode):
                o = flash_attn(q, k, v, **kwargs)
                if mode == "fwd+bwd":
                    torch.autograd.grad(o, (q, k, v), do)

            if mode == "fwd":
                with torch.no_grad():
                    times[impl] = timer(step)
            else:
                times[impl] = timer(step)
        ratio = times["varlen"] / times["full_causal"]
        records.append({
            "bench": BENCH, "pass": mode, "T": tokens, "head_dim": head_dim, "heads": heads,
            "n_docs": len(lengths), "mean_len": tokens / len(lengths), "max_len": max(lengths),
            "varlen_ms": times["varlen"], "full_causal_ms": times["full_causal"], "ratio": ratio,
            "ideal_ratio": ideal, "vs_ideal": ratio / ideal, "device": device,
        })  # fmt: skip
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    gpu = torch.cuda.is_available()
    parser.add_argument("--tokens", type=int, default=131072 if gpu else 4096)
    parser.add_argument("--mean", type=float, default=4096 if gpu else 256, help="mean document length")
    parser.add_argument("--heads", type=int, default=8 if gpu else 2)
    parser.add_argument("--head-dim", type=int, default=128 if gpu else 32)
    parser.add_argument("--out", default=None, help="results file (default: bench/results/<device>-<date>)")
    args = parser.parse_args(argv)
    if not gpu:
        print(f"{BENCH}: no CUDA device; running a small case on the reference path (not a timing)",
              file=sys.stderr)  # fmt: skip
    records = run(args.tokens, args.mean, args.heads, args.head_dim)
    header = ("pass", "T", "docs", "varlen ms", "causal ms", "ratio", "ideal", "vs ideal")
    print(" ".join(f"{h:>10}" for h in header))
    for r in records:
        row = (r["pass"], r["T"], r["n_docs"], f"{r['varlen_ms']:.3f}", f"{r['full_causal_ms']:.3f}",
               f"{r['ratio']:.4f}", f"{r['ideal_ratio']:.4f}", f"{r['vs_ideal']:.2f}")  # fmt: skip
        print(" ".join(f"{x:>10}" for x in row), flush=True)
    if gpu:
        path = write_results(BENCH, records, path=args.out)
        print(f"wrote {len(records)} records to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
