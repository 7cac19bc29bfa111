"""The cost of the zigzag ring decomposition itself, on one GPU: every rank's chunk-pair calls and
fp32 lse merges, run back to back, against one dense call over the whole sequence.

    python -m longctx.bench.ring                       # T = 32k, P = 2, 4, 8, head dim 128, bf16
    python -m longctx.bench.ring --seqlens 32768 65536 --ranks 4 8

Communication is left out (it overlaps the compute on a real ring): this measures how much the
split into `2P` chunks, the per-pair launches and the merges cost on top of a single kernel call.
Ideal is a ratio of 1.0; the target is within 10% (ratio <= 1.1) for forward and for fwd+bwd.
The pairs and offsets are the ones `parallel/ring.py` computes: rank `r` holds chunks `r` and
`2P-1-r`, and at step `s` attends the key chunks of rank `r - s`. Without CUDA it prints why and
exits 0.
"""

import argparse
import sys

import torch

from longctx.bench.common import do_bench, require_cuda, write_results

BENCH = "ring"


def ring_pairs(size: int):
    """(query chunk, key chunk) of every pair any rank computes, by (rank, step)."""
    for rank in range(size):
        for step in range(size):
            owner = (rank - step) % size
            for q_id in (rank, 2 * size - 1 - rank):
                for k_id in (owner, 2 * size - 1 - owner):
                    if k_id <= q_id:
                        yield q_id, k_id


def bench_shape(t: int, size: int, head_dim: int, heads: int, dtype, device="cuda") -> list[dict]:
    from longctx.kernels.flash_attn import (
        flash_attn,
        flash_attn_chunk_bwd,
        flash_attn_chunk_fwd,
        merge_partials,
    )

    c = t // (2 * size)
    q, k, v, do = (torch.randn(1, t, heads, head_dim, device=device, dtype=dtype) for _ in range(4))
    pairs = list(ring_pairs(size))

    def ring_forward():
        outs, lses = {}, {}
        for q_id, k_id in pairs:
            rows, cols = slice(q_id * c, (q_id + 1) * c), slice(k_id * c, (k_id + 1) * c)
            o, lse = flash_attn_chunk_fwd(q[:, rows], k[:, cols], v[:, cols], q_id * c, k_id * c)
            if q_id in outs:
                outs[q_id], lses[q_id] = merge_partials([outs[q_id], o.float()], [lses[q_id], lse])
            else:
                outs[q_id], lses[q_id] = o.float(), lse
        return outs, lses

    outs, lses = ring_forward()
    o_all = torch.cat([outs[i] for i in range(2 * size)], dim=1).to(dtype)
    lse_all = torch.cat([lses[i] for i in range(2 * size)], dim=2)

    def ring_backward():
        dq = torch.zeros_like(q, dtype=torch.float32)
        dk = torch.zeros_like(k, dtype=torch.float32)
        dv = torch.zeros_like(v, dtype=torch.float32)
        for q_id, k_id in pairs:
            rows, cols = slice(q_id * c, (q_id + 1) * c), slice(k_id * c, (k_id + 1) * c)
            dq_p, dk_p, dv_p = flash_attn_chunk_bwd(
                do[:, rows],
                q[:, rows],
                k[:, cols],
                v[:, cols],
                o_all[:, rows],
                lse_all[:, :, rows],
                q_id * c,
                k_id * c,
            )
            dq[:, rows] += dq_p
            dk[:, cols] += dk_p
            dv[:, cols] += dv_p

    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

    def dense_fwd_bwd():
        torch.autograd.grad(flash_attn(qg, kg, vg), (qg, kg, vg), do)

    dense = {"fwd": do_bench(lambda: flash_attn(q, k, v)), "fwd+bwd": do_bench(dense_fwd_bwd)}
    ring_fwd = do_bench(ring_forward)
    ring = {"fwd": ring_fwd, "fwd+bwd": ring_fwd + do_bench(ring_backward)}
    return [
        dict(
            bench=BENCH,
            T=t,
            ranks=size,
            head_dim=head_dim,
            heads=heads,
            dtype=str(dtype).removeprefix("torch."),
            **{"pass": p},
            dense_ms=dense[p],
            ring_ms=ring[p],
            ratio=ring[p] / dense[p],
        )
        for p in ("fwd", "fwd+bwd")
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[32768])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--out", help="results JSON (default bench/results/<device>-<date>.json)")
    args = parser.parse_args(argv)
    if not require_cuda(BENCH):
        return 0
    records = []
    for t in args.seqlens:
        for size in args.ranks:
            for r in bench_shape(t, size, args.head_dim, args.heads, torch.bfloat16):
                records.append(r)
                print(
                    f"T={t:>6} P={size} {r['pass']:>7}: dense {r['dense_ms']:8.2f} ms  "
                    f"ring {r['ring_ms']:8.2f} ms  ratio {r['ratio']:.3f}"
                )
    print(f"wrote {write_results(BENCH, records, path=args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
