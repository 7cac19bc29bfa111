"""A model of context parallelism from 8 to 1024 GPUs: bytes, messages, time, and whether it hides.

    longctx bench scale --config configs/hybrid-1b-32k.yaml --gpus 1024
    longctx bench scale --config configs/tiny.yaml --gpus 8 --seq-len 131072 --ib-gbs 25

Nobody here has 1024 GPUs, so nothing runs on N processes: for every mixer and scheme, the bytes and
messages each rank sends per layer and training step (forward + backward) come from the exchange
plans the layers use (`plan_bytes`: zigzag shards, the ring's hops, Ulysses' all-to-alls, USP's
split, S2's needed blocks per kv head from `parallel.s2.s2_needed_blocks`, L's state scan rounds). A
test checks them byte-exactly against what the gloo runs count (`longctx.parallel.comm_stats`).

Time is an alpha-beta model: a message costs `alpha + bytes / beta`, with NVLink inside a node of
`--gpus-per-node` GPUs and InfiniBand between nodes (defaults: H100 NVLink 4 at 450 GB/s and 2 us,
NDR InfiniBand at 50 GB/s per GPU and 5 us; flags override them). A rank's messages to peers on its
own node and on other nodes travel at the same time on their own links. A ring step waits for its
slowest hop, so a ring that leaves the node runs every step at InfiniBand speed. Compute is the core
attention / state FLOPs of one layer on one rank (projections and MLP excluded) at `--tflops`; the
backward costs 2.5x the forward for attention and 2x for the linear state. Only the ring overlaps its
messages with compute (per step); other schemes' messages are exposed, so `hides` is "yes" only for
a ring whose every step's message is shorter than that step's compute. NSA's exchange depends on
which blocks the data selects; the model takes its bound: every earlier block (as for a dense ring).
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from longctx.bench.common import write_results

BENCH = "scale"
SEQ_LENS = (131072, 1048576, 4194304)
GPUS = (8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass
class Links:
    nvlink_gbs: float = 450.0
    nvlink_us: float = 2.0
    ib_gbs: float = 50.0
    ib_us: float = 5.0
    tflops: float = 400.0
    gpus_per_node: int = 8

    def cost(self, intra: tuple[float, int], inter: tuple[float, int]) -> float:
        """Seconds for one rank's (bytes, messages) inside and across nodes, sent at once."""
        t_nv = intra[1] * self.nvlink_us * 1e-6 + intra[0] / (self.nvlink_gbs * 1e9)
        t_ib = inter[1] * self.ib_us * 1e-6 + inter[0] / (self.ib_gbs * 1e9)
        return max(t_nv, t_ib)


class Phase(NamedTuple):
    """One step of a layer's communication: the bytes this rank sends to each peer."""

    name: str
    by_peer: dict
    overlapped: bool  # runs under compute (a ring hop)
    backward: bool
    messages: int = 1  # per peer


def _kv_repeat(heads: int, kv_heads: int, size: int) -> int | None:
    if heads % size:
        return None
    if kv_heads % size == 0:
        return 1
    return size // kv_heads if size % kv_heads == 0 else None


def s2_need_counts(s2, heads: int, kv_heads: int, seq_len: int, size: int, rank: int) -> torch.Tensor:
    """`[P, H_kv]` blocks `rank` needs from each owner per kv head: `s2_needed_blocks` itself when its
    mask is small, else the same set from the pattern's closed form (a test checks they agree)."""
    from longctx.parallel.blocks import ZigzagBlocks
    from longctx.parallel.s2 import s2_needed_blocks

    geo = ZigzagBlocks(seq_len, size, s2.block_size)
    q_ids = geo.held_by(rank)
    n = geo.n_blocks
    if heads * len(q_ids) * n <= 2**20:
        need = s2_needed_blocks(s2, heads, kv_heads, q_ids, n)
    else:
        need = s2_need_closed_form(s2, heads, kv_heads, q_ids, n)
    return torch.zeros(size, kv_heads, dtype=torch.long).index_add_(0, geo.owner, need.long().t())


_counts_cache: dict = {}


def s2_all_counts(s2, heads: int, kv_heads: int, seq_len: int, size: int) -> torch.Tensor:
    """`[P, P, H_kv]` every rank's `s2_need_counts` (what `parallel.s2.need_counts` gives the layer)."""
    key = (s2.block_size, s2.local_blocks, s2.vert_stride, s2.dense_heads, heads, kv_heads, seq_len, size)
    if key not in _counts_cache:
        _counts_cache[key] = torch.stack(
            [s2_need_counts(s2, heads, kv_heads, seq_len, size, r) for r in range(size)]
        )
    return _counts_cache[key]


def s2_need_closed_form(s2, heads: int, kv_heads: int, q_ids: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """`[H_kv, n_blocks]` the blocks any head of each kv group may attend from `q_ids`, in O(H n):
    a local window behind each query block, and the strided blocks (every earlier one for dense heads)
    up to the last query block."""
    j = torch.arange(n_blocks)
    last = int(q_ids.max())
    # A block is in some query block's window iff a query block lies in [j, j + local_blocks).
    is_query = torch.zeros(n_blocks + s2.local_blocks, dtype=torch.long)
    is_query[q_ids] = 1
    count = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), is_query]), 0)
    in_window = (count[j + s2.local_blocks] - count[j]) > 0
    step = max(1, s2.vert_stride // heads)
    h = torch.arange(heads)
    strided = ((j[None] + 1 + h[:, None] * step) % s2.vert_stride == 0) | (h >= heads - s2.dense_heads)[
        :, None
    ]
    per_head = (strided & (j <= last)[None]) | in_window[None]
    return per_head.view(kv_heads, heads // kv_heads, n_blocks).any(dim=1)


def plan_bytes(
    model, scheme: str, seq_len: int, size: int, rank: int, itemsize: int, batch: int = 1, u: int = 1
):
    """Bytes rank `rank` of `size` sends in one layer, forward and backward, split by peer: a list of
    `Phase`s; the ring's phases are one hop each. `None` when the
    scheme cannot run this shape. Shapes and rules of the current `parallel` ops."""
    h, h_kv, d = model.n_heads, model.kv_heads, model.head_dim
    t_local = seq_len // size
    shard = batch * t_local * d * itemsize  # one head's tokens of this rank
    nxt = (rank + 1) % size
    if scheme == "D ring":
        kv = 2 * h_kv * shard
        fwd = [Phase("kv hop", {nxt: kv}, True, False)] * (size - 1)
        dkv = 2 * h_kv * batch * t_local * d * 4
        return fwd + [Phase("kv + fp32 dkv hop", {nxt: kv + dkv}, True, True, 2)] * (size - 1)
    if scheme == "D allgather":
        kv = 2 * h_kv * shard
        others = {p: kv for p in range(size) if p != rank}
        return [
            Phase("all-gather kv", others, False, False),
            Phase("reduce-scatter dkv", others, False, True),
        ]
    if scheme == "D ulysses":
        rep = _kv_repeat(h, h_kv, size)
        if rep is None:
            return None
        each = (2 * h + 2 * h_kv * rep) * shard // size  # q, o and k, v of the heads going to one peer
        others = {p: each for p in range(size) if p != rank}
        return [
            Phase("all-to-all q k v o", others, False, False),
            Phase("all-to-all dq dk dv do", others, False, True),
        ]
    if scheme == "D usp":
        rep = _kv_repeat(h, h_kv, u)
        if rep is None or size % u:
            return None
        ring = size // u
        g, j = divmod(rank, u)
        each = (2 * h + 2 * h_kv * rep) * shard // u
        node = {g * u + p: each for p in range(u) if p != j}
        # The ring runs on this group's 2/(2R) of the sequence, H / U heads: K, V of (kv heads / U).
        kv_ring = 2 * (h_kv * rep // u) * batch * (seq_len // ring) * d
        nxt_g = ((g + 1) % ring) * u + j
        phases = [
            Phase("all-to-all q k v o", node, False, False),
            Phase("all-to-all dq dk dv do", node, False, True),
        ]
        phases += [Phase("kv hop", {nxt_g: kv_ring * itemsize}, True, False)] * (ring - 1)
        phases += [Phase("kv + fp32 dkv hop", {nxt_g: kv_ring * (itemsize + 4)}, True, True, 2)] * (ring - 1)
        return phases
    if scheme == "S pattern":
        # The exchange `parallel.s2_exchange=auto` picks from the same plan (`parallel.s2`). Peer by
        # peer (`BlockPairs`): step s sends rank + s its needed blocks of mine, each kv head padded to
        # the longest head's count (the kernel's compact buffer), or the exact pairs where padding
        # would add more than `PAD_LIMIT` (`lands`), overlapped with the step's compute.
        # One-shot (`AllRemote`): every peer's exact pairs at once. Either way the backward fetches
        # them again and returns the fp32 dK, dV of the (real) pairs I took from each peer.
        from longctx.parallel.blocks import lands
        from longctx.parallel.s2 import choose_exchange

        s2 = model.s2
        pair = batch * s2.block_size * 2 * d  # one kv head's K and V of one block, in elements
        counts = s2_all_counts(s2, h, h_kv, seq_len, size)  # [rank, owner, kv head]
        peers = [p for p in range(size) if p != rank]
        back = {p: int(counts[rank, p].sum()) * pair * 4 for p in peers}
        if choose_exchange("auto", counts) == "oneshot":
            sends = {p: int(counts[p, rank].sum()) * pair * itemsize for p in peers}
            return [
                Phase("all remote blocks", sends, False, False),
                Phase("all remote blocks again", sends, False, True),
                Phase("fp32 dkv of blocks", back, False, True),
            ]
        sends = {}
        for p in peers:
            n_pairs, n_slots = int(counts[p, rank].sum()), h_kv * int(counts[p, rank].max())
            sends[p] = (n_pairs if lands(n_pairs, n_slots) else n_slots) * pair * itemsize
        return [
            *(Phase("blocks", {p: n}, True, False) for p, n in sends.items()),
            *(Phase("blocks again", {p: n}, True, True) for p, n in sends.items()),
            *(Phase("fp32 dkv of blocks", {p: n}, True, True) for p, n in back.items()),
        ]
    if scheme == "N select":
        # Bound: every earlier block is fetched, as by an all-gather of K, V (module docstring).
        c = model.nsa
        kv = 2 * h_kv * shard
        cmp_kv = 2 * h_kv * batch * (t_local // c.cmp_stride) * d * itemsize
        halo = 2 * (2 * h_kv) * batch * (c.cmp_block - c.cmp_stride) * d * itemsize
        others = {p: kv + cmp_kv + halo + h_kv * (seq_len // c.slc_block) for p in range(size) if p != rank}
        return [
            Phase("compressed + halo + blocks", others, False, False),
            Phase("their gradients", others, False, True),
        ]
    if scheme == "L state":
        # The scan's rounds (`parallel.linear.scan_rounds`): at most two fp32 (state, log-decay) maps
        # [B, H, Dk * Dv + 1] a round, to two different peers; the backward's reverse scan the same.
        from longctx.parallel.linear import scan_rounds

        one_map = batch * h * (d * d + 1) * 4
        rounds = [{p: one_map for _, p in sends if p != rank} for sends, _ in scan_rounds(rank, size)]
        rounds = [r for r in rounds if r]
        return [Phase("scan round", r, False, False) for r in rounds] + [
            Phase("reverse scan round", r, False, True) for r in rounds
        ]
    raise ValueError(f"unknown scheme {scheme!r}")


SCHEMES = ("D ring", "D ulysses", "D usp", "D allgather", "S pattern", "N select", "L state")


def layer_flops(model, letter: str, seq_len: int, size: int, batch: int = 1) -> float:
    """Forward + backward FLOPs of one layer's core on one rank (zigzag balances the causal work)."""
    h, d = model.n_heads, model.head_dim
    pairs = batch * h * seq_len * seq_len / 2  # causal (query, key) pairs of dense attention
    if letter == "S":
        # Visited (query block, key block) pairs per head, each a block_size^2 tile: the window
        # (min(local_blocks, i + 1)) plus the strided blocks more than a window back (all, for dense).
        s2 = model.s2
        n = seq_len // s2.block_size
        i = torch.arange(n)
        step = max(1, s2.vert_stride // h)
        window = torch.clamp(i + 1, max=s2.local_blocks).sum().item()
        blocks = 0
        for head in range(h):
            if head >= h - s2.dense_heads:
                blocks += n * (n + 1) // 2
                continue
            upto = torch.cumsum(((i + 1 + head * step) % s2.vert_stride == 0).long(), 0)  # strided j <= x
            far = i - s2.local_blocks
            blocks += window + upto[far[far >= 0]].sum().item()
        pairs = batch * blocks * s2.block_size**2
    elif letter == "N":
        c = model.nsa
        per_query = seq_len / c.cmp_stride / 2 + c.slc_top * c.slc_block + c.window
        pairs = batch * h * seq_len * per_query
    elif letter == "L":
        # Chunked linear attention: per token and head ~ 4 d^2 (state in/out) + 2 * 64 * d (intra-chunk).
        return 3.0 * batch * h * seq_len * (4 * d * d + 128 * d) / size
    return 3.5 * 4 * pairs * d / size  # QK^T and PV: 2 matmuls of 2 FLOPs per MAC; backward 2.5x


def predict(model, scheme: str, seq_len: int, size: int, links: Links, itemsize: int = 2) -> dict | None:
    """Rank 0's bytes, messages and times for one layer (forward + backward) under `links`."""
    gpn = links.gpus_per_node
    u = max(x for x in range(1, min(gpn, model.n_heads) + 1) if model.n_heads % x == 0 and size % x == 0)
    if scheme == "D usp" and size <= gpn:
        return None  # one node: Ulysses or the ring
    if seq_len % (2 * size * model.block_multiple()):
        return None
    phases = plan_bytes(model, scheme, seq_len, size, 0, itemsize, u=u)
    if phases is None:
        return None
    flops = layer_flops(model, scheme[0], seq_len, size)
    compute = flops / (links.tflops * 1e12)
    total = messages = inter_bytes = 0
    comm = exposed = 0.0
    ring_steps = sum(1 for phase in phases if phase.overlapped)
    hides = True
    for _, by_peer, overlapped, _, n_msg in phases:
        intra = [(b, n_msg) for p, b in by_peer.items() if p // gpn == 0 and b]
        inter = [(b, n_msg) for p, b in by_peer.items() if p // gpn != 0 and b]
        if overlapped and size > gpn:
            # A ring step lasts as long as its slowest hop: some hop leaves a node.
            inter, intra = intra + inter, []
        t = links.cost(
            tuple(map(sum, zip(*intra))) if intra else (0, 0),
            tuple(map(sum, zip(*inter))) if inter else (0, 0),
        )
        comm += t
        total += sum(by_peer.values())
        inter_bytes += sum(b for b, _ in inter)
        messages += sum(m for _, m in intra + inter)
        if overlapped:
            step_compute = compute / ring_steps
            hides &= t <= step_compute
            exposed += max(0.0, t - step_compute)
        else:
            hides = False
            exposed += t
    return dict(
        bench=BENCH, scheme=scheme, T=seq_len, gpus=size, ulysses_size=u if scheme == "D usp" else None,
        bytes_sent=total, inter_node_bytes=inter_bytes, messages=messages, comm_ms=comm * 1e3,
        compute_ms=compute * 1e3, layer_ms=(compute + exposed) * 1e3, hides=hides,
    )  # fmt: skip


def best_scheme(rows: list[dict], letter: str) -> dict:
    return min((r for r in rows if r["scheme"].startswith(letter)), key=lambda r: r["layer_ms"])


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["T"] for r in records})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for ax, t in zip(axes[0], lengths):
        for scheme in SCHEMES:
            rows = sorted(
                (r for r in records if r["T"] == t and r["scheme"] == scheme), key=lambda r: r["gpus"]
            )
            if rows:
                ax.plot([r["gpus"] for r in rows], [r["layer_ms"] for r in rows], marker="o", label=scheme)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="GPUs (= cp)",
            ylabel="ms per layer (fwd + bwd)",
            title=f"T = {t:,}",
        )
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    from longctx.config import load_config

    parser = argparse.ArgumentParser(prog="longctx bench scale", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/hybrid-1b-32k.yaml")
    parser.add_argument("--gpus", type=int, default=1024, help="largest GPU count (the table doubles from 8)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--seq-len", type=int, nargs="+", default=list(SEQ_LENS))
    parser.add_argument("--nvlink-gbs", type=float, default=450.0, help="NVLink GB/s per GPU, one direction")
    parser.add_argument("--nvlink-us", type=float, default=2.0, help="NVLink latency per message, us")
    parser.add_argument("--ib-gbs", type=float, default=50.0, help="InfiniBand GB/s per GPU (NDR 400 Gb/s)")
    parser.add_argument("--ib-us", type=float, default=5.0, help="InfiniBand latency per message, us")
    parser.add_argument("--tflops", type=float, default=400.0, help="achieved attention TFLOP/s (bf16)")
    parser.add_argument("--out", help="results JSON (default bench/results/<device>-<date>.json)")
    parser.add_argument("--plot", default="bench/results/scale.png")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.s2.vert_stride=8")
    args = parser.parse_args(argv)
    if args.gpus < 1 or args.gpus_per_node < 1:
        raise SystemExit("--gpus and --gpus-per-node must be >= 1")
    model = load_config(args.config, args.overrides).model
    links = Links(args.nvlink_gbs, args.nvlink_us, args.ib_gbs, args.ib_us, args.tflops, args.gpus_per_node)
    sizes = [n for n in GPUS if n <= args.gpus] or [args.gpus]
    records = []
    head = (
        f"{'T':>9} {'GPUs':>5} {'scheme':>12} {'MB sent':>9} {'IB MB':>9} {'msgs':>5} {'comm ms':>9} "
        f"{'compute ms':>10} {'layer ms':>9} hides"
    )
    print(
        f"{args.config}: {model.n_heads} heads, {model.kv_heads} kv heads, head dim {model.head_dim}; {links}"
    )
    print(head)
    for t in args.seq_len:
        for n in sizes:
            for scheme in SCHEMES:
                r = predict(model, scheme, t, n, links)
                if r is None:
                    continue
                records.append(r)
                print(
                    f"{t:>9} {n:>5} {scheme:>12} {r['bytes_sent'] / 2**20:9.1f} "
                    f"{r['inter_node_bytes'] / 2**20:9.1f} "
                    f"{r['messages']:>5} {r['comm_ms']:9.3f} {r['compute_ms']:10.3f} {r['layer_ms']:9.3f} "
                    f"{'yes' if r['hides'] else 'no'}",
                    flush=True,
                )
    for r in records:
        r.update(config=args.config, links=vars(links))
    print("fastest D scheme (layer ms, fwd + bwd):")
    lines = ["| T | GPUs | " + " | ".join(SCHEMES) + " | fastest D |", "|---" * (len(SCHEMES) + 3) + "|"]
    for t in args.seq_len:
        for n in sizes:
            rows = {r["scheme"]: r for r in records if r["T"] == t and r["gpus"] == n}
            if not rows:
                continue
            best = best_scheme(list(rows.values()), "D")["scheme"]
            print(f"  T={t:>9} GPUs={n:>5}: {best}")
            cells = [
                f"{rows[s]['layer_ms']:.2f}{'' if rows[s]['hides'] else '*'}" if s in rows else "-"
                for s in SCHEMES
            ]
            lines.append(f"| {t} | {n} | " + " | ".join(cells) + f" | {best} |")
    table = Path(args.plot).with_suffix(".md")
    table.parent.mkdir(parents=True, exist_ok=True)
    note = "ms per layer (forward + backward, exposed communication included); * = communication not hidden"
    table.write_text(f"{args.config}, {links}\n\n{note}\n\n" + "\n".join(lines) + "\n")
    path = write_results(BENCH, records, path=args.out)
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    plot(records, Path(args.plot))
    print(f"wrote {path}, {table} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
