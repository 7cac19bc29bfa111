"""Bytes each context-parallel scheme sends per layer, forward and backward, measured on CPU/gloo.

    longctx bench comm                                   # T 8192, P = 2, 4, 8, every mixer and scheme
    python -m longctx.bench.comm --seq-len 16384 --ranks 2 4 --out /tmp/comm.json

For every P it spawns P gloo processes; each runs one layer's core (the part of a mixer that talks
to other ranks) forward and backward on its zigzag shard of random inputs and reads
`longctx.parallel.comm_stats()`: the same counters the trainer logs as `comm_bytes`. Rank 0's bytes
are reported (the zigzag layout makes every rank's volume about equal), with the dense ring's
forward+backward as the yardstick (`vs_ring`). NSA's volume depends on which blocks the queries
select; random inputs select scattered blocks, close to the worst case for its exchange.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longctx.bench.common import write_results
from longctx.train.distributed import free_port

BENCH = "comm"
SCHEMES = [
    ("D", "ring"),
    ("D", "ulysses"),
    ("D", "allgather"),
    ("S", "pattern"),
    ("N", "select"),
    ("L", "state"),
    ("G", "state"),
]


def _core(letter: str, scheme: str, cfg):
    from longctx.parallel.context import DENSE_SCHEMES
    from longctx.parallel.linear import StatePassingLinearCore
    from longctx.parallel.nsa import ContextParallelNSACore
    from longctx.parallel.s2 import ContextParallelS2Core

    if letter == "D":
        return DENSE_SCHEMES[scheme](None, None)
    if letter == "S":
        return ContextParallelS2Core(cfg.s2, None)
    if letter == "N":
        return ContextParallelNSACore(cfg.nsa, None)
    if letter == "G":
        from longctx.model.mixers.delta import GatedDeltaCore
        from longctx.parallel.delta import StatePassingDeltaCore

        return StatePassingDeltaCore(GatedDeltaCore(cfg.n_heads, cfg.kv_heads, cfg.head_dim), None)
    return StatePassingLinearCore(None)


def _measure(letter, scheme, cfg, rank, size, seq_len, batch):
    from longctx.model.mixers.nsa import BlockCompressor
    from longctx.parallel import SeqLayout, comm_stats, reset_comm_stats

    torch.manual_seed(rank)
    h, h_kv, d = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    t = seq_len // size
    layout = SeqLayout.zigzag(seq_len, rank, size)
    q = torch.randn(batch, t, h, d, requires_grad=True)
    kv_heads = h if letter == "L" else h_kv
    k = torch.randn(batch, t, kv_heads, d, requires_grad=True)
    v = torch.randn(batch, t, kv_heads, d, requires_grad=True)
    core = _core(letter, scheme, cfg)
    reset_comm_stats()
    if letter == "N":
        comps = [BlockCompressor(d, cfg.nsa.cmp_block, cfg.nsa.cmp_stride) for _ in range(2)]
        for comp in comps:
            comp.init_weights(0.02)
        gates = torch.rand(batch, t, h, 3)
        out = core(q, k, v, gates, *comps, layout)
    elif letter == "L":
        g = -torch.rand(batch, t, h) * 0.1
        out = core(q, k, v, g, layout)
    elif letter == "G":
        # Pre-convolution q | k | v channels, the mixer's decay and write strength, conv weights.
        qkv = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)
        g, beta = -torch.rand(batch, t, h) * 0.1, torch.rand(batch, t, h)
        out = core(qkv, g, beta, torch.randn(qkv.shape[-1], 1, 4) * 0.5, layout)
    else:
        out = core(q, k, v, layout)
    forward = comm_stats()["bytes_sent"]
    out.backward(torch.ones_like(out))
    return forward, comm_stats()["bytes_sent"] - forward


def _worker(rank, size, port, out_dir, cfg, seq_len, batch):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    rows = []
    for letter, scheme in SCHEMES:
        fwd, bwd = _measure(letter, scheme, cfg, rank, size, seq_len, batch)
        rows.append((letter, scheme, fwd, bwd))
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        torch.save(rows, Path(out_dir) / "rows.pt")


def measure(cfg, seq_len: int, size: int, batch: int = 1) -> list[dict]:
    """One record per (mixer, scheme) with rank 0's forward / backward bytes for one layer."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _worker,
            args=(size, free_port(), out_dir, cfg, seq_len, batch),
            nprocs=size,
            start_method="spawn",
        )
        rows = torch.load(Path(out_dir) / "rows.pt", weights_only=True)
    ring = next(f + b for letter, s, f, b in rows if (letter, s) == ("D", "ring"))
    shape = dict(
        bench=BENCH, T=seq_len, P=size, batch=batch, heads=cfg.n_heads, kv_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, dtype="float32",
    )  # fmt: skip
    return [
        dict(shape, mixer=letter, scheme=scheme, fwd_bytes=f, bwd_bytes=b, total_bytes=f + b,
             vs_ring=round((f + b) / ring, 4))
        for letter, scheme, f, b in rows
    ]  # fmt: skip


def main(argv=None) -> int:
    from longctx.config import load_config

    parser = argparse.ArgumentParser(prog="longctx bench comm", description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--config", default=None, help="model shape (default: dim 512, 8 heads, 2 kv heads)")
    parser.add_argument("--out", help="results JSON (default bench/results/<device>-<date>.json)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.s2.vert_stride=8")
    args = parser.parse_args(argv)
    defaults = ["model.dim=512", "model.n_heads=8", "model.n_kv_heads=2"] if args.config is None else []
    cfg = load_config(args.config, [*defaults, *args.overrides]).model
    records = []
    print(f"{'P':>3} {'mixer':>5} {'scheme':>10} {'fwd MB':>9} {'bwd MB':>9} {'vs ring':>8}")
    for size in args.ranks:
        for r in measure(cfg, args.seq_len, size, args.batch):
            records.append(r)
            print(
                f"{size:>3} {r['mixer']:>5} {r['scheme']:>10} {r['fwd_bytes'] / 2**20:9.2f} "
                f"{r['bwd_bytes'] / 2**20:9.2f} {r['vs_ring']:8.3f}",
                flush=True,
            )
    print(f"wrote {write_results(BENCH, records, path=args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
