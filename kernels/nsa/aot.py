"""Compile every NSA Triton kernel for a GPU target on a machine without one.

    python -m longctx.kernels.nsa.aot            # sm_90 (H100): H=16/64 bf16, H=16 fp32, head dim 128
    python -m longctx.kernels.nsa.aot --quick    # H=16 bf16 only (what tests/test_nsa.py runs)

The interpreter that runs the CPU tests checks the numbers but not what only the GPU compiler
rejects (matmul operands under 16, more shared memory than the SM has, ops without a lowering). This
runs the real launchers on small CPU tensors with each kernel swapped for a recorder, then compiles
every recorded launch (same constexprs, warps and stages, 16-byte aligned pointers as the JIT assumes)
for the target with `triton.compile`, and fails if a kernel does not compile or needs more shared
memory than the target has. Needs Triton in compiled mode: run it without `TRITON_INTERPRET=1`.
"""

import argparse
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from longctx.kernels.nsa import cmp_attn, common, select_attn, select_blocks

# Dynamic shared memory one block may use on sm_90 (H100), in bytes.
SMEM_LIMIT = {90: 232448}
KERNELS = [
    (select_attn, "_select_fwd_kernel"),
    (select_attn, "_select_bwd_dq_kernel"),
    (select_attn, "_select_bwd_dkdv_kernel"),
    (cmp_attn, "_cmp_fwd_kernel"),
    (cmp_attn, "_cmp_bwd_dq_kernel"),
    (cmp_attn, "_cmp_bwd_dkdv_kernel"),
    (select_blocks, "_select_blocks_kernel"),
    (common, "_softmax_delta_kernel"),
]
_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32"}


class Recorder:
    """Stands in for a `@triton.jit` kernel: `kernel[grid](*args, **kwargs)` records the call."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.kernel, args, kwargs))


def record_launches(heads, kv_heads, head_dim, dtype, t=256):
    """Run the forward and backward launchers of every op once; return the recorded launches."""
    calls = []
    originals = {(m, n): getattr(m, n) for m, n in KERNELS}
    for (module, name), kernel in originals.items():
        setattr(module, name, Recorder(kernel, calls))
    try:
        q = torch.randn(1, t, heads, head_dim, dtype=dtype)
        k, v = torch.randn(2, 1, t, kv_heads, head_dim, dtype=dtype)
        idx = select_attn.normalize_block_idx(
            torch.randint(0, t // 64, (1, t, kv_heads, 16), dtype=torch.int32), 64, t, 0, 0
        )
        o, lse = select_attn.select_attn_fwd(q, k, v, idx, 64, head_dim**-0.5, 0, 0)
        select_attn.select_attn_bwd(q, k, v, idx, o, lse, o, lse, 64, head_dim**-0.5, 0, 0)
        k_cmp, v_cmp = k[:, : t // 16], v[:, : t // 16]
        o, lse = cmp_attn.cmp_attn_fwd(q, k_cmp, v_cmp, 32, 16, head_dim**-0.5, 0)
        cmp_attn.cmp_attn_bwd(q, k_cmp, v_cmp, o, lse, o, lse, 32, 16, head_dim**-0.5, 0)
        select_blocks.select_blocks(q, k_cmp, lse, 32, 16, 64, 16, head_dim**-0.5)
    finally:
        for (module, name), kernel in originals.items():
            setattr(module, name, kernel)
    return calls


def compile_launch(kernel, args, kwargs, target):
    """`triton.compile` one recorded launch; returns the compiled kernel's metadata."""
    options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
    names = kernel.arg_names
    values = dict(zip(names, args), **kwargs)
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        value = values[name]
        if name in kwargs:
            signature[name] = "constexpr"
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if value % 16 == 0 and value != 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    constexprs = {(names.index(n),): v for n, v in kwargs.items()}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=target, options=options).metadata


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--quick", action="store_true", help="only H=16, H_kv=1 in bf16 (training's path)")
    args = parser.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    configs = [(16, 1, torch.bfloat16)]
    if not args.quick:
        configs += [(64, 4, torch.bfloat16), (16, 1, torch.float32)]
    failures = 0
    for heads, kv_heads, dtype in configs:
        seen = set()
        for kernel, launch_args, kwargs in record_launches(heads, kv_heads, 128, dtype):
            key = (kernel.fn.__name__, tuple(sorted(kwargs.items())))
            if key in seen:
                continue
            seen.add(key)
            label = f"{kernel.fn.__name__:<26} H={heads:<3} H_kv={kv_heads} {str(dtype):<15}"
            try:
                smem = compile_launch(kernel, launch_args, dict(kwargs), target).shared
            except Exception as e:  # report every kernel, then fail
                print(f"{label} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                failures += 1
                continue
            limit = SMEM_LIMIT.get(args.arch, SMEM_LIMIT[90])
            ok = smem <= limit
            failures += not ok
            print(f"{label} shared memory {smem:>6} B {'ok' if ok else f'> {limit}: FAILED'}")
    print("aot:", "passed" if not failures else f"{failures} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
