"""Every kernel against its peer in one run: dense vs SDPA flash, S2 vs dense and FlexAttention, NSA vs
dense, gated linear attention vs flash-linear-attention.

    longctx bench kernels [--out FILE] [--only flash_attn,s2_attn]

Each benchmark is also runnable alone (`python -m longctx.bench.<name> --help` for its options);
this runs them with their defaults into one results file. Without CUDA each says why and skips.
"""

import argparse
import importlib
import sys

KERNEL_BENCHES = ("flash_attn", "s2_attn", "nsa", "gla", "ring", "varlen")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="longctx bench kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(KERNEL_BENCHES)}")
    parser.add_argument("--out", help="results JSON (default bench/results/<device>-<date>.json)")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(KERNEL_BENCHES)
    unknown = sorted(set(names) - set(KERNEL_BENCHES))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(KERNEL_BENCHES)}")
    code = 0
    for name in names:
        print(f"== {name}", flush=True)
        module = importlib.import_module(f"longctx.bench.{name}")
        code |= module.main(["--out", args.out] if args.out else [])
    return code


if __name__ == "__main__":
    sys.exit(main())
