"""Every kernel against its peer in one run: dense vs SDPA flash, S2 vs dense and FlexAttention, NSA vs
dense, gated linear attention and the gated delta rule vs flash-linear-attention.

    longctx bench kernels [--out FILE] [--only flash_attn,s2_attn] [--quick]

Each benchmark is also runnable alone (`python -m longctx.bench.<name> --help` for its options);
this runs them with their defaults into one results file. Without CUDA each says why and skips.
"""

import argparse
import importlib
import sys

KERNEL_BENCHES = ("flash_attn", "s2_attn", "nsa", "gla", "gated_delta", "ring", "varlen")
# `--quick` (what `make gpu-check` runs): 16k and 64k tokens, the README targets' head dim 128.
QUICK = {
    "flash_attn": ["--seqlens", "16384,65536", "--head-dims", "128"],
    "s2_attn": ["--seq-lens", "16384", "65536"],
    "nsa": ["--lengths", "16384,65536", "--no-breakdown"],
    "gla": ["--lengths", "16384", "65536"],
    "gated_delta": ["--lengths", "16384", "65536"],
    "ring": ["--seqlens", "32768", "--ranks", "8"],
    "varlen": [],
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="longctx bench kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(KERNEL_BENCHES)}")
    parser.add_argument("--out", help="results JSON (default bench/results/<device>-<date>.json)")
    parser.add_argument("--quick", action="store_true", help="16k and 64k tokens only (make gpu-check)")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(KERNEL_BENCHES)
    unknown = sorted(set(names) - set(KERNEL_BENCHES))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(KERNEL_BENCHES)}")
    code = 0
    for name in names:
        print(f"== {name}", flush=True)
        module = importlib.import_module(f"longctx.bench.{name}")
        extra = QUICK[name] if args.quick else []
        code |= module.main([*extra, *(["--out", args.out] if args.out else [])])
    return code


if __name__ == "__main__":
    sys.exit(main())
