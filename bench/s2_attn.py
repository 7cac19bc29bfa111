"""S2 sparse attention against the dense kernel and FlexAttention on the same block mask (GPU only).

    python -m longctx.bench.s2_attn                        # T 8k..128k, 16 heads, hd 128, bf16
    python -m longctx.bench.s2_attn --seq-lens 8192 32768 --heads 32 --kv-heads 8 --impls s2 flex

For each T and pass (fwd, bwd, fwd+bwd) it times (median ms, `triton.testing.do_bench`):
- `s2`: `longctx.kernels.s2_attn` (Triton, autotuned on first use);
- `dense`: `longctx.kernels.flash_attn`, causal, the same shapes;
- `flex`: `torch.nn.attention.flex_attention`, compiled (max-autotune), with a `BlockMask` built from
  the same S2 block pattern (`s2_block_mask`): blocks below the diagonal are full, the diagonal block
  is partial with a causal `mask_mod`.
and reports S2's speed-up over each, and its fraction of the ideal: ideal = dense time x the fraction
of causal (head, query block, key block) pairs S2 allows. At the first T it also checks that S2 and
Flex give the same output. Records go to `bench/results/<device>-<date>.json`. Defaults follow the
issue's target: `vert_stride 16`, a 512-token local window (`block_size 64, local_blocks 8`), and
S2 >= 10x dense at 128k forward+backward, faster than Flex on the same mask.
"""

import argparse
import sys

import torch

from longctx.bench.common import attention_flops, device_name, do_bench, require_cuda, write_results

PASSES = ("fwd", "bwd", "fwd+bwd")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="GQA kv heads (default: --heads)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--local-blocks", type=int, default=8)
    p.add_argument("--vert-stride", type=int, default=16)
    p.add_argument("--dense-heads", type=int, default=0)
    p.add_argument("--impls", nargs="+", default=["s2", "dense", "flex"], choices=["s2", "dense", "flex"])
    p.add_argument("--flex-block", type=int, default=None, help="Flex sparse block (default: --block-size)")
    p.add_argument("--no-write", action="store_true", help="print only, do not write bench/results")
    p.add_argument("--out", help="results JSON (default bench/results/<device>-<date>.json)")
    return p.parse_args(argv)


def allowed_fraction(args, seq_len: int) -> float:
    """Allowed (head, query block, key block) pairs over causal ones, counted on the S2 pattern."""
    from longctx.kernels.s2_attn.blocks import S2BlockLists

    ids = torch.arange(-(-seq_len // args.block_size))
    partial = seq_len % args.block_size != 0
    lists = S2BlockLists(
        args.heads, ids, ids, args.local_blocks, args.vert_stride, args.dense_heads, "cuda", partial, partial
    )
    n = len(ids)
    return lists.num_pairs / (args.heads * n * (n + 1) / 2)


def flex_block_mask(args, seq_len: int, block: int, device="cuda"):
    """The S2 pattern as a Flex `BlockMask` of `block`-token blocks, built from `s2_block_mask`."""
    from torch.nn.attention.flex_attention import BlockMask

    from longctx.kernels.s2_attn.naive import s2_block_mask

    # A Flex block of `block` tokens is listed if any S2 block inside it is allowed. With S2's block
    # size, blocks below the diagonal are full (no mask_mod) and the diagonal is partial; a coarser
    # Flex block makes every listed block partial. The mask_mod is S2's exact token rule either way,
    # so eager Flex (which evaluates mask_mod densely) and compiled Flex agree.
    if block % args.block_size:
        raise ValueError(f"--flex-block must be a multiple of --block-size {args.block_size}, got {block}")
    n = -(-seq_len // block)
    ids = torch.arange(n, device=device)
    s2_ids = torch.arange(-(-seq_len // args.block_size), device=device)
    heads = args.heads
    ratio = block // args.block_size
    coarse = torch.zeros(heads, n, n, dtype=torch.bool, device=device)
    for h in range(heads):
        fine = s2_block_mask(
            heads, s2_ids, s2_ids, args.local_blocks, args.vert_stride, args.dense_heads,
            torch.tensor([h], device=device),
        )[0]  # fmt: skip
        pad = n * ratio - fine.shape[0]
        fine = torch.nn.functional.pad(fine, (0, pad, 0, pad))
        coarse[h] = fine.view(n, ratio, n, ratio).any(3).any(1)
    exact = ratio == 1
    diagonal = ids[:, None] == ids[None, :]
    full = coarse & ~diagonal if exact else torch.zeros_like(coarse)
    partial = coarse & diagonal if exact else coarse

    def csr(m):
        counts = m.sum(-1, dtype=torch.int32)[None]  # [1, H, n]
        indices = torch.argsort(~m, dim=-1, stable=True).to(torch.int32)[None]  # listed blocks first
        return counts, indices

    head_step = max(1, args.vert_stride // heads)

    def s2_mask_mod(b, h, q_idx, kv_idx):
        qb, kb = q_idx // args.block_size, kv_idx // args.block_size
        strided = (kb + 1 + h * head_step) % args.vert_stride == 0
        dense = h >= heads - args.dense_heads
        return (kv_idx <= q_idx) & ((qb - kb < args.local_blocks) | strided | dense)

    num, idx = csr(partial)
    full_num, full_idx = csr(full)
    return BlockMask.from_kv_blocks(
        num, idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=s2_mask_mod,
        seq_lengths=(seq_len, seq_len),
    )  # fmt: skip


def make_impl(name: str, args, seq_len: int):
    """`(fn(q, k, v) -> o, layout)` of one implementation; layout 'bthd', or 'bhtd' for Flex."""
    from longctx.kernels import flash_attn, s2_attn

    if name == "s2":
        s2 = dict(
            block_size=args.block_size, local_blocks=args.local_blocks, vert_stride=args.vert_stride,
            dense_heads=args.dense_heads,
        )  # fmt: skip
        return (lambda q, k, v: s2_attn(q, k, v, **s2)), "bthd"
    if name == "dense":
        return (lambda q, k, v: flash_attn(q, k, v, causal=True)), "bthd"
    from torch.nn.attention.flex_attention import flex_attention

    mask = flex_block_mask(args, seq_len, args.flex_block or args.block_size)
    flex = torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")
    gqa = args.kv_heads != args.heads
    return (lambda q, k, v: flex(q, k, v, block_mask=mask, enable_gqa=gqa)), "bhtd"


def time_impl(fn, layout, args, seq_len):
    """Median ms of each pass, and the forward output (in `[B, T, H, D]`) for the cross-check."""
    g = torch.Generator(device="cuda").manual_seed(0)
    shape_q = (args.batch, seq_len, args.heads, args.head_dim)
    shape_kv = (args.batch, seq_len, args.kv_heads, args.head_dim)

    def rand(shape):
        x = torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16)
        return (x.transpose(1, 2).contiguous() if layout == "bhtd" else x).requires_grad_()

    q, k, v = rand(shape_q), rand(shape_kv), rand(shape_kv)
    do = rand(shape_q).detach()
    o = fn(q, k, v)
    out = {
        "fwd": do_bench(lambda: fn(q, k, v)),
        "bwd": do_bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True)),
        "fwd+bwd": do_bench(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do)),
    }
    return out, (o.transpose(1, 2) if layout == "bhtd" else o).detach()


def run(args) -> list[dict]:
    args.kv_heads = args.kv_heads or args.heads
    records = []
    common = {
        "bench": "s2_attn", "batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads,
        "head_dim": args.head_dim, "block_size": args.block_size, "local_blocks": args.local_blocks,
        "vert_stride": args.vert_stride, "dense_heads": args.dense_heads, "dtype": "bf16",
    }  # fmt: skip
    for i, seq_len in enumerate(args.seq_lens):
        fraction = allowed_fraction(args, seq_len)
        times, outputs = {}, {}
        for name in args.impls:
            try:
                times[name], outputs[name] = time_impl(*make_impl(name, args, seq_len), args, seq_len)
            except Exception as e:
                # A baseline that cannot run at this length (memory, or a compile failure) is
                # recorded as such and the others still run; a failing S2 kernel is a bug.
                if name == "s2":
                    raise
                first_line = (str(e).splitlines() or [type(e).__name__])[0][:300]
                print(f"T={seq_len} {name}: skipped ({type(e).__name__}: {first_line})", file=sys.stderr)
                records.append({**common, "impl": name, "T": seq_len, "error": first_line})
            torch.cuda.empty_cache()
        check = {}
        if i == 0 and "s2" in outputs and "flex" in outputs:
            a, b = outputs["s2"].float(), outputs["flex"].float()
            check["rel_diff_vs_flex"] = float((a - b).norm() / b.norm())
            # Both compute the same masked attention in bf16: expect ~1e-2 or less, not O(1).
            print(f"T={seq_len} S2 vs Flex output: relative difference {check['rel_diff_vs_flex']:.1e}")
        for name, per_pass in times.items():
            for mode, ms in per_pass.items():
                flops = attention_flops(args.batch, args.heads, seq_len, seq_len, args.head_dim, True, mode)
                if name != "dense":
                    flops *= fraction  # the work S2's pattern actually needs
                rec = {
                    **common,
                    "impl": name,
                    "pass": mode,
                    "T": seq_len,
                    "ms": ms,
                    "tflops": flops / ms / 1e9,
                }
                if name == "s2":
                    rec["allowed_fraction"] = fraction
                    rec.update(check)
                    if "dense" in times:
                        rec["speedup_vs_dense"] = times["dense"][mode] / ms
                        rec["fraction_of_ideal"] = times["dense"][mode] * fraction / ms
                    if "flex" in times:
                        rec["speedup_vs_flex"] = times["flex"][mode] / ms
                records.append(rec)
        print_rows(seq_len, fraction, times)
    return records


def print_rows(seq_len, fraction, times):
    for mode in PASSES:
        cells = [f"T={seq_len:>6} {mode:>7} allowed={fraction:.3f}"]
        cells += [f"{name}={per_pass[mode]:8.2f}ms" for name, per_pass in times.items()]
        if "s2" in times:
            s2 = times["s2"][mode]
            if "dense" in times:
                dense = times["dense"][mode]
                cells.append(f"x{dense / s2:5.1f} vs dense, {dense * fraction / s2:4.0%} of ideal")
            if "flex" in times:
                cells.append(f"x{times['flex'][mode] / s2:4.2f} vs flex")
        print("  ".join(cells), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not require_cuda("s2_attn"):
        return 0
    print(f"s2_attn on {device_name()}: B={args.batch} H={args.heads} hd={args.head_dim} bf16", flush=True)
    records = run(args)
    if not args.no_write:
        print(f"wrote {write_results('s2_attn', records, path=args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
