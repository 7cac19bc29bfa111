"""Benchmark the gated delta rule: longctx's chunked kernel against flash-linear-attention's
`chunk_gated_delta_rule` (the same op) and dense causal attention (`longctx.kernels.flash_attn`), in
bf16: forward, backward and forward+backward, T from 4k to 128k.

    python -m longctx.bench.gated_delta                           # H=16, D=128, 128k tokens a batch
    python -m longctx.bench.gated_delta --head-dim 64 --lengths 4096 16384 --tokens 65536

Each batch holds `--tokens` tokens (B = tokens // T), so time per token compares across lengths.
Records (ms, tokens/s, ns per token, the speed-up over flash-linear-attention and the relative
difference of output and gradients) go to bench/results/<device>-<date>.json under "gated_delta".
flash-linear-attention is optional (`pip install flash-linear-attention`): without it that peer is
reported missing and skipped. Needs CUDA; without it the script says so and exits. longctx's forward
and backward are both Triton kernels (kernels/gated_delta/chunk.py).
"""

import argparse
import sys

import torch
import torch.nn.functional as F

from longctx.bench.common import require_cuda, write_results
from longctx.bench.gla import time_passes
from longctx.kernels import flash_attn, gated_delta_rule

NAME = "gated_delta"


def peers(scale: float) -> dict:
    """name -> fn(q, k, v, g, beta) returning the output; flash-linear-attention only when installed."""
    impls = {"longctx": lambda q, k, v, g, beta: gated_delta_rule(q, k, v, g, beta, scale=scale)[0]}
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError as err:
        print(
            f"{NAME}: flash-linear-attention is not installed ({err}); skipping that peer "
            "(pip install flash-linear-attention)",
            file=sys.stderr,
        )
    else:
        impls["fla"] = lambda q, k, v, g, beta: chunk_gated_delta_rule(q, k, v, g, beta, scale=scale)[0]
    impls["dense"] = lambda q, k, v, g, beta: flash_attn(q, k, v, causal=True, scale=scale)
    return impls


def make_inputs(batch: int, t: int, heads: int, head_dim: int):
    shape = (batch, t, heads, head_dim)
    q, k = (F.normalize(torch.randn(shape, device="cuda"), dim=-1).to(torch.bfloat16) for _ in range(2))
    v = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    # Decays and write strengths like the G mixer's at init.
    g = -F.softplus(torch.randn(batch, t, heads, device="cuda") - 4.0)
    beta = torch.rand(batch, t, heads, device="cuda")
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


def compare(impls, inputs) -> dict:
    results = {}
    for name in ("longctx", "fla"):
        out = impls[name](*inputs)
        grad_out = torch.ones_like(out) / out.numel() ** 0.5
        results[name] = [out.detach(), *torch.autograd.grad(out, inputs, grad_out)]
    labels = ["o", "dq", "dk", "dv", "dg", "dbeta"]
    return {
        f"rel_diff_{label}": float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))
        for label, a, b in zip(labels, results["longctx"], results["fla"])
    }


def bench(lengths, tokens: int, heads: int, head_dim: int, dense_max_len: int) -> list[dict]:
    impls = peers(head_dim**-0.5)
    records = []
    for t in lengths:
        batch = max(1, tokens // t)
        inputs = make_inputs(batch, t, heads, head_dim)
        shape = {"T": t, "batch": batch, "heads": heads, "head_dim": head_dim, "dtype": "bf16"}
        times = {}
        for name, fn in impls.items():
            if name == "dense" and t > dense_max_len:
                continue
            try:
                times[name] = time_passes(fn, inputs)
            except torch.cuda.OutOfMemoryError:
                print(f"{NAME}: {name} at T={t}, B={batch}: out of memory, skipped", file=sys.stderr)
                torch.cuda.empty_cache()
        check = compare(impls, inputs) if "fla" in impls else {}
        for name, by_pass in times.items():
            for mode, ms in by_pass.items():
                rec = {"bench": NAME, "impl": name, "pass": mode, **shape, "ms": ms}
                rec["tokens_per_s"] = batch * t / (ms * 1e-3)
                rec["ns_per_token"] = ms * 1e6 / (batch * t)
                if name == "longctx" and "fla" in times:
                    rec["speedup_vs_fla"] = times["fla"][mode] / ms
                    rec.update(check)
                records.append(rec)
                print(
                    f"T={t:>6} B={batch:>3} {name:>8} {mode:>7}: {ms:9.3f} ms  "
                    f"{rec['tokens_per_s'] / 1e6:8.2f} Mtok/s  {rec['ns_per_token']:7.2f} ns/tok"
                    + (f"  {rec['speedup_vs_fla']:.2f}x fla" if "speedup_vs_fla" in rec else "")
                )
        del inputs
        torch.cuda.empty_cache()
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m longctx.bench.{NAME}", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--tokens", type=int, default=131072, help="tokens per batch (B = tokens // T)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dense-max-len", type=int, default=131072, help="skip dense attention above this T")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write bench/results")
    parser.add_argument("--out", help="results JSON (default bench/results/<device>-<date>.json)")
    args = parser.parse_args(argv)
    if not require_cuda(NAME):
        return 0
    records = bench(args.lengths, args.tokens, args.heads, args.head_dim, args.dense_max_len)
    if not args.no_write:
        print(f"{NAME}: results in {write_results(NAME, records, path=args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
