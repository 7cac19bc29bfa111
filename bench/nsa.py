"""NSA (the N mixer's core) against dense causal attention, forward + backward, on one GPU.

    python -m longctx.bench.nsa                        # T = 8k..128k, H=16, H_kv=1, head dim 128, bf16
    python -m longctx.bench.nsa --heads 64 --kv-heads 4 --lengths 16384,65536
    python -m longctx.bench.nsa --select-rows 16,64    # sweep the selection kernel's rows per program
    python -m longctx.bench.nsa --check                # compiled kernels vs the reference, small T

"NSA" is everything `NSACore` runs for a layer: key/value compression (two MLPs), attention over
compressed tokens, block importance + top-k, selection attention, the sliding window
(`flash_attn(window=...)`) and the gated mix, forward and backward with respect to q, k, v, the
gates and the compressors' weights. "dense" is `longctx.kernels.flash_attn(causal=True)` on the same
q, k, v. Both time `fwd+bwd` with `triton.testing.do_bench` (median). The break-even length is the
shortest measured T at which NSA is faster. A per-branch breakdown is recorded too. Results go to
`bench/results/<device>-<date>.json`. Without CUDA it prints why and exits.
"""

import argparse
import sys

import torch

from longctx.bench.common import attention_flops, do_bench, require_cuda, write_results
from longctx.config import NSAConfig
from longctx.kernels import backend, flash_attn, nsa_cmp_attn, nsa_select_attn, nsa_select_blocks
from longctx.model.mixers.nsa import BlockCompressor, NSACore
from longctx.parallel.layout import SeqLayout


def make_inputs(t, heads, kv_heads, head_dim, cfg: NSAConfig, dtype, device, seed=0):
    """q, k, v, gates (leaves needing grad) and the two compressors, initialised like the model."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def leaf(*shape, scale=1.0):
        x = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale
        return x.to(dtype).requires_grad_()

    q = leaf(1, t, heads, head_dim)
    k = leaf(1, t, kv_heads, head_dim)
    v = leaf(1, t, kv_heads, head_dim)
    gates = torch.sigmoid(leaf(1, t, heads, 3)).detach().requires_grad_()
    compressors = []
    for _ in range(2):
        comp = BlockCompressor(head_dim, cfg.cmp_block, cfg.cmp_stride).to(device)
        comp.init_weights(0.02)
        compressors.append(comp.to(dtype))
    return q, k, v, gates, compressors


def fwd_bwd(fn, inputs):
    """A closure running `fn()` and its backward (gradients w.r.t. `inputs`, not accumulated)."""

    def run():
        out = fn()
        torch.autograd.grad(out, inputs, torch.ones_like(out))

    return run


def time_length(t: int, args, cfg: NSAConfig, dtype) -> list[dict]:
    """Dense and NSA fwd+bwd at one length (NSA once per `--select-rows` value), and the breakdown."""
    from longctx.kernels.nsa.triton import select_attn

    q, k, v, gates, (ck, cv) = make_inputs(t, args.heads, args.kv_heads, args.head_dim, cfg, dtype, "cuda")
    core, layout = NSACore(cfg), SeqLayout.full(t)
    params = [q, k, v, gates, *ck.parameters(), *cv.parameters()]
    base = dict(bench="nsa", T=t, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim)
    base.update(dtype=str(dtype).removeprefix("torch."), **{f"nsa_{f}": getattr(cfg, f) for f in vars(cfg)})
    records = []

    def measure(impl, fn, inputs, flops=None, **extra):
        ms = time_or_oom(fwd_bwd(fn, inputs))
        rec = dict(base, impl=impl, **{"pass": "fwd+bwd"}, ms=ms, **extra)
        if ms is not None and flops is not None:
            rec["tflops"] = flops / ms * 1e-9
        records.append(rec)
        print(f"T={t:>6} {impl:<24} {'out of memory' if ms is None else f'{ms:9.2f} ms'}", flush=True)
        return ms

    dense_flops = attention_flops(1, args.heads, t, t, args.head_dim, True, "fwd+bwd")
    dense = measure("dense", lambda: flash_attn(q, k, v, causal=True), [q, k, v], dense_flops)
    for rows in args.select_rows:
        select_attn.SELECT_ROWS = rows
        ms = measure("nsa", lambda: core(q, k, v, gates, ck, cv, layout), params, select_rows=rows)
        if ms is not None and dense is not None:
            records[-1]["speedup_vs_dense"] = dense / ms
            print(f"T={t:>6} {'':<24} {dense / ms:9.2f} x dense (select rows {rows})")
    select_attn.SELECT_ROWS = args.select_rows[0]
    if args.breakdown:
        records += breakdown(t, q, k, v, ck, cv, cfg, base)
    return records


def time_or_oom(fn) -> float | None:
    try:
        return do_bench(fn)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def breakdown(t, q, k, v, ck, cv, cfg: NSAConfig, base) -> list[dict]:
    """fwd+bwd of each branch alone (the block choice is forward only: it is not differentiable)."""
    c = cfg
    with torch.no_grad():
        k_cmp, v_cmp = ck(k), cv(v)
        _, lse = nsa_cmp_attn(q, k_cmp, v_cmp, c.cmp_block, c.cmp_stride, return_lse=True)
        idx = nsa_select_blocks(q, k_cmp, lse, c.cmp_block, c.cmp_stride, c.slc_block, c.slc_top)
    k_cmp, v_cmp = k_cmp.detach().requires_grad_(), v_cmp.detach().requires_grad_()
    parts = {
        "compress(k)+compress(v)": (lambda: ck(k) + cv(v), [k, v, *ck.parameters(), *cv.parameters()]),
        "cmp_attn": (lambda: nsa_cmp_attn(q, k_cmp, v_cmp, c.cmp_block, c.cmp_stride), [q, k_cmp, v_cmp]),
        "select_attn": (lambda: nsa_select_attn(q, k, v, idx, c.slc_block), [q, k, v]),
        "window": (lambda: flash_attn(q, k, v, causal=True, window=c.window), [q, k, v]),
    }
    records = []
    for name, (fn, inputs) in parts.items():
        ms = time_or_oom(fwd_bwd(fn, inputs))
        records.append(dict(base, impl=f"nsa:{name}", **{"pass": "fwd+bwd"}, ms=ms))
        print(f"T={t:>6}   {name:<22} {'out of memory' if ms is None else f'{ms:9.2f} ms'}")
    ms = do_bench(lambda: nsa_select_blocks(q, k_cmp, lse, c.cmp_block, c.cmp_stride, c.slc_block, c.slc_top))
    records.append(dict(base, impl="nsa:select_blocks", **{"pass": "fwd"}, ms=ms))
    print(f"T={t:>6}   {'select_blocks (fwd)':<22} {ms:9.2f} ms")
    return records


def break_even(records: list[dict]) -> int | None:
    """Shortest T at which NSA (best rows setting) beats dense, or None."""
    by_t: dict[int, dict[str, float]] = {}
    for r in records:
        if r["impl"] in ("nsa", "dense") and r["ms"] is not None:
            best = by_t.setdefault(r["T"], {})
            best[r["impl"]] = min(best.get(r["impl"], float("inf")), r["ms"])
    wins = sorted(t for t, m in by_t.items() if "nsa" in m and "dense" in m and m["nsa"] < m["dense"])
    return wins[0] if wins else None


def check(cfg: NSAConfig, heads, kv_heads, head_dim, t=2048 + 37, device="cuda", dtypes=None) -> bool:
    """Compiled kernels against the reference path on one small problem, output and all gradients.
    Tolerances: bf16 storage rounds at 2^-8 (~4e-3) and GPU fp32 matmuls run in tf32 (~1e-3), so a
    few times those; a wrong mask or a missed block costs far more."""
    ok = True
    for dtype, tol in dtypes or ((torch.bfloat16, 3e-2), (torch.float32, 1e-2)):
        q, k, v, gates, (ck, cv) = make_inputs(t, heads, kv_heads, head_dim, cfg, dtype, device)
        layout = SeqLayout.full(t)
        core = NSACore(cfg)
        params = [q, k, v, gates, *ck.parameters(), *cv.parameters()]
        results = {}
        for name in ("naive", "triton"):
            with backend(name):
                out = core(q, k, v, gates, ck, cv, layout)
                grads = torch.autograd.grad(out, params, torch.ones_like(out))
            results[name] = [out, *grads]
        for i, (a, b) in enumerate(zip(results["triton"], results["naive"])):
            err = float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))
            print(f"check {str(dtype):>15} tensor {i:2d} rel err {err:.2e}")
            ok &= err < tol
    print("check:", "passed" if ok else "FAILED")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--select-rows", default="16", help="comma list: rows per selection program")
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    parser.add_argument("--check", action="store_true", help="compare with the reference and exit")
    parser.add_argument("--no-save", dest="save", action="store_false")
    parser.add_argument("--out", help="results JSON (default bench/results/<device>-<date>.json)")
    args = parser.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.select_rows = [int(x) for x in args.select_rows.split(",")]
    if not require_cuda("nsa"):
        return 0
    cfg = NSAConfig()  # DESIGN.md defaults: cmp 32/16, slc 64 x 16, window 512
    if args.check:
        return 0 if check(cfg, args.heads, args.kv_heads, args.head_dim) else 1
    records = []
    for t in args.lengths:
        records += time_length(t, args, cfg, torch.bfloat16)
        torch.cuda.empty_cache()
    t_even = break_even(records)
    records.append(
        dict(bench="nsa", impl="summary", break_even_T=t_even, heads=args.heads, kv_heads=args.kv_heads)
    )
    print(f"break-even: {'none in the measured lengths' if t_even is None else f'T = {t_even}'}")
    if args.save:
        print("results:", write_results("nsa", records, path=args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
