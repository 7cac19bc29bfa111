"""Dense flash attention against PyTorch SDPA's flash backend: forward, backward and both, bf16, causal.

    python -m longctx.bench.flash_attn                      # T 4k..64k, head dims 64 and 128
    python -m longctx.bench.flash_attn --seqlens 16384 --head-dims 128 --out /tmp/fa.json

Batch x heads shrinks as T grows (`B = 1`, `H = 2**18 / T`), so every row holds the same number of
(token, head) pairs and the memory stays flat. Each (T, head dim) gives one record per implementation
and pass with milliseconds (median of `triton.testing.do_bench`) and TFLOP/s (causal FLOPs: half of
the dense count; backward 2.5x forward), and `speedup` = SDPA time / ours on our records. The first
call of each shape autotunes the kernels; do_bench's warm-up absorbs it. Results go to
`bench/results/<device>-<date>.json` (or `--out`). Without CUDA it prints why and exits 0.
"""

import argparse
import sys

import torch

from longctx.bench.common import attention_flops, do_bench, require_cuda, write_results

BENCH = "flash_attn"
PAIRS_PER_ROW = 2**18
PASSES = ("fwd", "bwd", "fwd+bwd")


def _timers(attend, q, k, v, do):
    """Closures timing forward, backward alone (graph kept, gradients not accumulated) and both."""
    out = attend(q, k, v)
    return {
        "fwd": lambda: attend(q, k, v),
        "bwd": lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True),
        "fwd+bwd": lambda: torch.autograd.grad(attend(q, k, v), (q, k, v), do),
    }


def bench_shape(t: int, head_dim: int, dtype=torch.bfloat16, device: str = "cuda") -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from longctx.kernels import flash_attn

    b, h = 1, max(1, PAIRS_PER_ROW // t)
    shape = dict(
        bench=BENCH, T=t, head_dim=head_dim, batch=b, heads=h, dtype=str(dtype).removeprefix("torch.")
    )
    # Each implementation gets its own layout: ours [B, T, H, D], SDPA [B, H, T, D].
    q, k, v, do = (torch.randn(b, t, h, head_dim, device=device, dtype=dtype) for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    qs, ks, vs, dos = (x.detach().transpose(1, 2).contiguous() for x in (q, k, v, do))
    qs, ks, vs = (x.requires_grad_() for x in (qs, ks, vs))

    def ours(q_, k_, v_):
        return flash_attn(q_, k_, v_, causal=True)

    def sdpa(q_, k_, v_):
        return torch.nn.functional.scaled_dot_product_attention(q_, k_, v_, is_causal=True)

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.no_grad():
        max_diff = float((ours(q, k, v).float() - sdpa(qs, ks, vs).transpose(1, 2).float()).abs().max())
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ms = {
            "longctx": {p: do_bench(f) for p, f in _timers(ours, q, k, v, do).items()},
            "sdpa_flash": {p: do_bench(f) for p, f in _timers(sdpa, qs, ks, vs, dos).items()},
        }
    records = []
    for impl, by_pass in ms.items():
        for mode, t_ms in by_pass.items():
            flops = attention_flops(b, h, t, t, head_dim, True, mode)
            rec = dict(
                shape, impl=impl, **{"pass": mode}, ms=round(t_ms, 4), tflops=round(flops / t_ms / 1e9, 1)
            )
            if impl == "longctx":
                rec["speedup"] = round(ms["sdpa_flash"][mode] / t_ms, 3)
                rec["max_abs_diff_vs_sdpa"] = max_diff
            records.append(rec)
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--seqlens", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 8192, 16384, 32768, 65536]
    )
    parser.add_argument("--head-dims", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128])
    parser.add_argument(
        "--out", default=None, help="results file (default bench/results/<device>-<date>.json)"
    )
    args = parser.parse_args(argv)
    if not require_cuda(BENCH):
        return 0
    records = []
    header = ("T", "D", "pass", "ours ms", "sdpa ms", "ours TF/s", "sdpa TF/s", "ratio")
    print(" ".join(f"{h:>10}" for h in header))
    for head_dim in args.head_dims:
        for t in args.seqlens:
            try:
                shape_records = bench_shape(t, head_dim)
            except torch.OutOfMemoryError as err:
                print(f"T={t} D={head_dim}: out of memory ({err})", file=sys.stderr)
                continue
            records += shape_records
            by = {(r["impl"], r["pass"]): r for r in shape_records}
            for mode in PASSES:
                a, s = by[("longctx", mode)], by[("sdpa_flash", mode)]
                row = (t, head_dim, mode, a["ms"], s["ms"], a["tflops"], s["tflops"], a["speedup"])
                print(" ".join(f"{x:>10}" for x in row), flush=True)
    path = write_results(BENCH, records, path=args.out)
    print(f"wrote {len(records)} records to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
