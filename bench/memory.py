"""Memory per rank under context parallelism: what one layer's core keeps for the backward, measured.

    longctx bench memory                                  # T 2048, P = 1, 2, 4, 8, every mixer
    longctx bench memory --seq-len 16384 --ranks 1 8      # the issue's T (hours under the interpreter)

For every P it spawns P gloo processes (P = 1: the single-device core, no process group); each runs
one layer's core forward and backward on its zigzag shard of random fp32 inputs, for D (ring and
Ulysses), S, N and L, and measures two things:

- saved: the bytes autograd keeps for the backward, through
  `torch.autograd.graph.saved_tensors_hooks`. Kernels' autograd Functions keep their tensors with
  `ctx.save_for_backward`, which the hook sees; a storage saved twice (or a view of it) counts once.
- peak: the largest total of live tensors the forward and backward create (a `TorchDispatchMode`
  that tracks every op's outputs until their storage is freed): transient buffers included (received
  blocks, gathered states), the inputs excluded.

The Triton kernels' wrappers run (`TRITON_INTERPRET=1`, set before torch is imported in each process)
so that what is saved is what the GPU path saves, not the reference's `T x T` scores. With
`--kernels interpret` (the default) the kernels themselves run in the interpreter: exact but slow
(one process at T = 1024 did not finish in 10 minutes on a loaded 2-core machine). With
`--kernels skip` every Triton launch is a no-op: the wrappers allocate and save the same tensors
(sizes come from shapes, never from values, since no CP path reads the device from the host), so
the bytes are the same and T = 16k takes minutes; `tests/test_bench_memory.py` checks that the two
modes give identical bytes. Reported per
mixer and P: the largest rank's bytes, and against the target of DESIGN.md ("memory falls as 1/P"),
`ratio = (saved at the largest P - halo) / (saved at P=1 / P)`, PASS when <= 1.3; the halo is what a
rank must hold whatever P is (S: `local_blocks - 1` blocks before each chunk; N: the window and
compression halos and the `T / cmp_stride` compressed tokens; L: the states entering the rank's two
chunks, which the scan keeps for its backward).

    longctx bench memory --kernels skip --seq-len 16384              # the issue's T, minutes
    longctx bench memory --kernels skip --mixers S-pattern N-select  # some mixers only
"""

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
import weakref
from pathlib import Path

BENCH = "memory"
# D usp: Ulysses inside groups of U = gcd(P, kv heads) ranks (no kv head replicated), the ring across.
MIXERS = [("D", "ring"), ("D", "ulysses"), ("D", "usp"), ("S", "pattern"), ("N", "select"), ("L", "state")]
# The default layer shape (config overrides on the command line change it).
SHAPE = [
    "model.dim=128", "model.n_heads=8", "model.n_kv_heads=2", "model.s2.block_size=16",
    "model.s2.local_blocks=4", "model.s2.vert_stride=8", "model.nsa.slc_block=16", "model.nsa.slc_top=4",
    "model.nsa.window=64", "model.nsa.cmp_block=16", "model.nsa.cmp_stride=8",
]  # fmt: skip


class LiveBytes:
    """A `TorchDispatchMode` that tracks the bytes of every tensor its ops create until freed."""

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode

        class _Mode(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.live, self.now, self.peak = {}, 0, 0

            def _free(self, key):
                self.now -= self.live.pop(key, 0)

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                import torch

                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else [out]:
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        storage = t.untyped_storage()
                        key = storage.data_ptr()
                        if key and key not in self.live:
                            self.live[key] = storage.nbytes()
                            self.now += storage.nbytes()
                            weakref.finalize(storage, self._free, key)
                self.peak = max(self.peak, self.now)
                return out

        return _Mode()


def _saved_bytes():
    import torch

    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), seen


def _core(letter, scheme, cfg, size):
    from longctx.model.mixers.attention import DenseCore, S2Core
    from longctx.model.mixers.linear import LinearCore
    from longctx.model.mixers.nsa import NSACore
    from longctx.parallel.context import DENSE_SCHEMES
    from longctx.parallel.linear import StatePassingLinearCore
    from longctx.parallel.nsa import ContextParallelNSACore
    from longctx.parallel.s2 import ContextParallelS2Core

    if size == 1:
        return {"D": lambda: DenseCore(), "S": lambda: S2Core(cfg.s2), "N": lambda: NSACore(cfg.nsa)}.get(
            letter, LinearCore
        )()
    if letter == "D" and scheme == "usp":
        from longctx.parallel.usp import UspDenseCore, UspGroups

        return UspDenseCore(None, UspGroups(None, math.gcd(size, cfg.kv_heads)))
    return {
        "D": lambda: DENSE_SCHEMES[scheme](None, None),
        "S": lambda: ContextParallelS2Core(cfg.s2, None),
        "N": lambda: ContextParallelNSACore(cfg.nsa, None),
        "L": lambda: StatePassingLinearCore(None),
    }[letter]()


def measure_one(letter, scheme, cfg, rank, size, seq_len):
    """(saved bytes, peak live bytes) of one layer's core on `rank` of `size`."""
    import torch

    from longctx.model.mixers.nsa import BlockCompressor
    from longctx.parallel import SeqLayout

    torch.manual_seed(rank)
    h, h_kv, d = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    t = seq_len // size
    layout = SeqLayout.full(seq_len) if size == 1 else SeqLayout.zigzag(seq_len, rank, size)
    kv_heads = h if letter == "L" else h_kv
    q = torch.randn(1, t, h, d, requires_grad=True)
    k, v = (torch.randn(1, t, kv_heads, d, requires_grad=True) for _ in range(2))
    extra = []
    if letter == "N":
        comps = [BlockCompressor(d, cfg.nsa.cmp_block, cfg.nsa.cmp_stride) for _ in range(2)]
        for comp in comps:
            comp.init_weights(0.02)
        extra = [torch.rand(1, t, h, 3), *comps]
    elif letter == "L":
        extra = [-torch.rand(1, t, h) * 0.1]
    core = _core(letter, scheme, cfg, size)
    hooks, seen = _saved_bytes()
    mode = LiveBytes()
    with mode:
        with hooks:
            out = core(q, k, v, *extra, layout)
        saved = sum(seen.values())
        out.backward(torch.ones_like(out))
        del out
    return saved, mode.peak


def halo_bytes(letter, cfg, seq_len, size, itemsize=4) -> int:
    """What a rank holds whatever P is (module docstring)."""
    d, h_kv = cfg.head_dim, cfg.kv_heads
    if letter == "S":
        return 2 * (cfg.s2.local_blocks - 1) * cfg.s2.block_size * h_kv * 2 * d * itemsize
    if letter == "N":
        c = cfg.nsa
        halo = 2 * (c.window + c.cmp_block - c.cmp_stride) * h_kv * 2 * d
        return (halo + seq_len // c.cmp_stride * h_kv * 2 * d) * itemsize
    if letter == "L":
        return 2 * cfg.n_heads * (d * d + 1) * 4
    return 0


@contextlib.contextmanager
def skip_kernel_launches():
    """Inside, every Triton launch `kernel[grid](...)` is a no-op (jit, autotuned and heuristics
    kernels alike): the wrappers around them still allocate and save what they do."""
    from triton.runtime.jit import KernelInterface

    launch = KernelInterface.__getitem__
    KernelInterface.__getitem__ = lambda self, grid: lambda *args, **kwargs: None
    try:
        yield
    finally:
        KernelInterface.__getitem__ = launch


def _worker(rank, size, port, out_dir, cfg, seq_len, mixers, skip):
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if size > 1:
        dist.init_process_group("gloo", rank=rank, world_size=size)
    with skip_kernel_launches() if skip else contextlib.nullcontext():
        rows = [
            (letter, scheme, *measure_one(letter, scheme, cfg, rank, size, seq_len))
            for letter, scheme in mixers
        ]
    if size > 1:
        dist.barrier()
        dist.destroy_process_group()
    torch.save(rows, Path(out_dir) / f"{rank}.pt")


def measure(cfg, seq_len: int, size: int, mixers=MIXERS, skip: bool = False) -> list[tuple]:
    """Per mixer of `mixers`: (letter, scheme, largest rank's saved bytes, largest rank's peak bytes);
    `skip`: Triton launches are no-ops (module docstring)."""
    import torch
    import torch.multiprocessing as mp

    from longctx.train.distributed import free_port

    # The workers' kernels run under the Triton interpreter (module docstring).
    os.environ["TRITON_INTERPRET"] = "1"
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _worker, args=(size, free_port(), out_dir, cfg, seq_len, mixers, skip), nprocs=size,
            start_method="spawn",
        )  # fmt: skip
        ranks = [torch.load(Path(out_dir) / f"{r}.pt", weights_only=True) for r in range(size)]
    return [
        (letter, scheme, max(r[i][2] for r in ranks), max(r[i][3] for r in ranks))
        for i, (letter, scheme) in enumerate(mixers)
    ]


def main(argv=None) -> int:
    from longctx.bench.common import write_results
    from longctx.config import load_config

    parser = argparse.ArgumentParser(prog="longctx bench memory", description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--out", help="results JSON (default bench/results/<device>-<date>.json)")
    parser.add_argument("--table", default="bench/results/memory.md", help="markdown table path")
    names = [f"{letter}-{scheme}" for letter, scheme in MIXERS]
    parser.add_argument("--mixers", nargs="+", choices=names, default=names, help="mixers to measure")
    parser.add_argument(
        "--kernels", choices=["interpret", "skip"], default="interpret",
        help="run the Triton kernels in the interpreter, or make their launches no-ops (same bytes, fast)",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="config overrides (default shape below)")
    args = parser.parse_args(argv)
    if 1 not in args.ranks:
        raise SystemExit("--ranks must include 1 (the target compares against one process)")
    cfg = load_config(None, [*SHAPE, *args.overrides]).model
    bad = [p for p in args.ranks if cfg.n_heads % p]
    if bad:
        raise SystemExit(
            f"D ulysses splits {cfg.n_heads} heads over the ranks: --ranks {bad} do not divide them; "
            "pick ranks that divide model.n_heads (or raise it)"
        )
    mixers = [m for m in MIXERS if f"{m[0]}-{m[1]}" in args.mixers]
    by_p = {}
    for size in sorted(args.ranks):
        started = time.time()
        by_p[size] = measure(cfg, args.seq_len, size, mixers, skip=args.kernels == "skip")
        print(f"P={size} done in {time.time() - started:.0f} s", flush=True)
    top = max(by_p)
    lines = [
        f"T = {args.seq_len}, fp32, batch 1, {cfg.n_heads} heads, {cfg.kv_heads} kv heads, head dim "
        f"{cfg.head_dim}; MiB per rank (largest rank); kernels: {args.kernels}",
        "",
        "| mixer | " + " | ".join([*(f"saved P={p}" for p in by_p), *(f"peak P={p}" for p in by_p)])
        + f" | halo | ratio P={top} | target |",
        "|---" * (2 * len(by_p) + 4) + "|",
    ]  # fmt: skip
    records = []
    for i, (letter, scheme) in enumerate(mixers):
        saved = {p: rows[i][2] for p, rows in by_p.items()}
        peak = {p: rows[i][3] for p, rows in by_p.items()}
        halo = halo_bytes(letter, cfg, args.seq_len, top)
        ratio = (saved[top] - halo) / (saved[1] / top)
        verdict = "PASS" if ratio <= 1.3 else "FAIL"
        mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
        lines.append(
            f"| {letter} {scheme} | " + " | ".join(mib(saved[p]) for p in by_p) + " | "
            + " | ".join(mib(peak[p]) for p in by_p) + f" | {mib(halo)} | {ratio:.2f} | {verdict} |"
        )  # fmt: skip
        for p in by_p:
            records.append(
                dict(bench=BENCH, mixer=letter, scheme=scheme, T=args.seq_len, P=p, kernels=args.kernels,
                     saved_bytes=saved[p],
                     peak_bytes=peak[p], halo_bytes=halo if p == top else None,
                     ratio=round(ratio, 3) if p == top else None, target=verdict if p == top else None)
            )  # fmt: skip
    table = "\n".join(lines)
    print(table)
    Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    Path(args.table).write_text(table + "\n")
    print(f"wrote {write_results(BENCH, records, path=args.out)} and {args.table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
