"""Context parallelism for S, N, L and G layers: each core on P = 2 and 4 gloo processes (L also on 3)
against one process (fp64), outputs and every gradient, and the bytes each moves.

Every case runs in one spawn of 4 processes (the `runs` fixture): the P = 2 cases on the process group
of ranks 0 and 1, the P = 3 cases on ranks 0-2, the P = 4 cases on all four. A spawn costs each
process seconds of imports; one launch instead of one per case saves most of this file's time."""

import pytest
import torch

from longctx.kernels.gla.naive import gla_recurrent_ref
from longctx.parallel import SeqLayout, comm_stats, reset_comm_stats, zigzag_shard, zigzag_unshard
from tests.dist_utils import spawn


def _run_core(rank, world, group, core_fn, inputs, do):
    layout = SeqLayout.zigzag(inputs[0].shape[1], rank, world)
    local = [zigzag_shard(t, rank, world).clone().requires_grad_() for t in inputs]
    reset_comm_stats()
    o = core_fn(group)(*local, layout)
    o.backward(zigzag_shard(do, rank, world))
    return o.detach(), [t.grad for t in local], comm_stats()


def _gather(results):
    o = zigzag_unshard([r[0] for r in results])
    grads = [zigzag_unshard([r[1][i] for r in results]) for i in range(len(results[0][1]))]
    return o, grads


def _cases_worker(rank, world, cases):
    """Run every case `(P, worker, args)` on the process group of ranks 0..P-1."""
    import torch.distributed as dist

    groups = {p: dist.new_group(list(range(p))) for p in sorted({p for p, _, _ in cases.values()})}
    return {
        key: worker(rank, p, groups[p], *args) for key, (p, worker, args) in cases.items() if rank < p
    }


@pytest.fixture(scope="module")
def runs():
    """Every case's inputs and per-rank results (ranks 0..P-1), from one spawn of 4 processes."""
    torch.manual_seed(0)
    cases = {}
    for world in (2, 3, 4):
        for variant in ("weak", "strong", "docs"):
            cases[("linear", world, variant)] = (world, *_linear_case(world, variant))
    for world in (2, 4):
        cases[("delta", world)] = (world, *_delta_case(world))
        cases[("exchange", world)] = (world, *_exchange_case(world))
        cases[("nsa", world)] = (world, *_nsa_case(world))
        for n_kv, dense in ((4, 0), (2, 1)):
            for exchange in ("peer", "oneshot"):
                cases[("s2", world, n_kv, dense, exchange)] = (world, *_s2_case(world, n_kv, dense, exchange))
    results = spawn(_cases_worker, 4, (cases,))
    return {key: (args, [r[key] for r in results[:p]]) for key, (p, _, args) in cases.items()}


def _linear_worker(rank, world, group, inputs, do, cu):
    from longctx.parallel.layout import Documents
    from longctx.parallel.linear import StatePassingLinearCore

    layout = SeqLayout.zigzag(inputs[0].shape[1], rank, world)
    if cu is not None:
        layout = layout.with_docs(Documents(cu))
    local = [zigzag_shard(t, rank, world).clone().requires_grad_() for t in inputs]
    reset_comm_stats()
    o = StatePassingLinearCore(group)(*local, layout)
    o.backward(zigzag_shard(do, rank, world))
    return o.detach(), [t.grad for t in local], comm_stats()


# Chunks are 20 tokens: row 0 starts documents inside a chunk (7), at a chunk start (20), 3 tokens
# later and inside a later chunk; row 1 has one document crossing every chunk boundary after 45.
LINEAR_DOCS = [[0, 7, 20, 23, 61], [0, 45]]


def _linear_case(world, variant):
    t, b, h, d = 8 * world * 5, 2, 3, 8
    q, k, v = (torch.randn(b, t, h, d, dtype=torch.float64) for _ in range(3))
    g = -torch.rand(b, t, h, dtype=torch.float64) * (20.0 if variant == "strong" else 0.5)
    do = torch.randn(b, t, h, d, dtype=torch.float64)
    cu = None
    if variant == "docs":
        cu = torch.full((b, len(LINEAR_DOCS[0]) + 1), t, dtype=torch.int32)
        for row, starts in enumerate(LINEAR_DOCS):
            cu[row, : len(starts)] = torch.tensor(starts, dtype=torch.int32)
    return _linear_worker, ((q, k, v, g), do, cu)


def _scan_messages(rank, world):
    """Maps rank `rank` sends in the forward scan: Hillis-Steele over the 2P chunk positions, position
    `i` to `i + 2^k` in round `k`, except between the rank's own two chunks (zigzag: `r`, `2P-1-r`)."""
    owner = [*range(world), *reversed(range(world))]
    count, step = 0, 1
    while step < 2 * world:
        mine = (rank, 2 * world - 1 - rank)
        count += sum(1 for i in mine if i + step < 2 * world and owner[i + step] != rank)
        step *= 2
    return count


def _linear_reference(q, k, v, g, do, cu):
    """One process, fp64, the recurrence; with documents each document alone from a zero state."""
    ref_in = [x.clone().requires_grad_() for x in (q, k, v, g)]
    if cu is None:
        ref, _ = gla_recurrent_ref(*ref_in)
        ref.backward(do)
        return ref.detach(), [x.grad for x in ref_in]
    out, grads = torch.zeros_like(do), [torch.zeros_like(x) for x in ref_in]
    for row, starts in enumerate(LINEAR_DOCS):
        for begin, end in zip(starts, [*starts[1:], q.shape[1]]):
            part = [x[row : row + 1, begin:end].clone().requires_grad_() for x in (q, k, v, g)]
            o, _ = gla_recurrent_ref(*part)
            o.backward(do[row : row + 1, begin:end])
            out[row, begin:end] = o[0].detach()
            for acc, x in zip(grads, part):
                acc[row, begin:end] = x.grad[0]
    return out, grads


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("variant", ["weak", "strong", "docs"])
def test_linear_state_scan_matches_one_process(runs, world, variant):
    """L layers: output and the gradients of q, k, v, g equal one process (fp64), with weak and
    strong decay and with packed documents; the cross-rank scan sends O(log P) states a rank."""
    ((q, k, v, g), do, cu), results = runs[("linear", world, variant)]
    b, _, h, d = q.shape
    ref, ref_grads = _linear_reference(q, k, v, g, do, cu)
    o, grads = _gather(results)
    assert torch.allclose(o, ref, atol=1e-10)
    for grad, want in zip(grads, ref_grads):
        assert torch.allclose(grad, want, atol=1e-9)
    if cu is not None:
        # The check can fail: without the document resets the output differs.
        assert not torch.allclose(o, _linear_reference(q, k, v, g, do, None)[0], atol=1e-3)
    # Forward and backward scans each send one (state, decay) map per message, the same count.
    per_map = b * h * (d * d + 1) * 8  # fp64 in this test
    for rank, r in enumerate(results):
        assert r[2]["bytes_sent"] == 2 * _scan_messages(rank, world) * per_map
        assert r[2]["bytes_sent"] <= 2 * 2 * (2 * world - 1).bit_length() * per_map


@pytest.mark.parametrize("world", [1, 2, 3, 5, 6, 7, 8, 12, 1000])
def test_scan_rounds_pair_up_and_cover_every_earlier_chunk(world):
    """The scan's plan at sizes no test can spawn: every message sent is received by the peer in the
    same round (and no peer gets two from one rank), and following the rounds each chunk's exclusive
    accumulator covers exactly the chunks before it, composed in order."""
    from longctx.parallel.linear import scan_rounds, zigzag_chunk_ids

    n = 2 * world
    plans = [scan_rounds(r, world) for r in range(world)]
    assert all(len(plan) == (n - 1).bit_length() for plan in plans)
    # Chunk intervals [lo, hi] each position's map covers; the exclusive one starts empty.
    x = {c: (c, c) for c in range(n)}
    e = {c: None for c in range(n)}
    for k in range(len(plans[0])):
        step = 2**k
        sent = {}
        for r in range(world):
            sends, _ = plans[r][k]
            assert len({peer for _, peer in sends if peer != r}) == len([p for _, p in sends if p != r])
            for slot, peer in sends:
                sent[(r, zigzag_chunk_ids(r, world)[slot] + step)] = peer
        new_x, new_e = dict(x), dict(e)
        for r in range(world):
            _, recvs = plans[r][k]
            for slot, peer in recvs:
                pos = zigzag_chunk_ids(r, world)[slot]
                assert sent.pop((peer, pos)) == r
                lo, hi = x[pos - step]
                assert hi + 1 == (pos if e[pos] is None else e[pos][0])
                new_e[pos] = (lo, pos - 1 if e[pos] is None else e[pos][1])
                new_x[pos] = (lo, x[pos][1])
        assert not sent, f"sent but not received: {sent}"
        x, e = new_x, new_e
    assert e == {c: None if c == 0 else (0, c - 1) for c in range(n)}


def _delta_worker(rank, world, group, qkv, g, beta, weight, do, heads, docs):
    """The CP core without documents, then (same launch) on packed documents `docs` ((cu_seqlens, starts))."""
    from longctx.model.mixers.delta import GatedDeltaCore
    from longctx.parallel.delta import StatePassingDeltaCore
    from longctx.parallel.layout import Documents

    out = []
    for cu in (None, docs[0]):
        layout = SeqLayout.zigzag(qkv.shape[1], rank, world)
        if cu is not None:
            layout = layout.with_docs(Documents(cu))
        local = [zigzag_shard(t, rank, world).clone().requires_grad_() for t in (qkv, g, beta)]
        w = weight.clone().requires_grad_()
        reset_comm_stats()
        o = StatePassingDeltaCore(GatedDeltaCore(*heads), group)(*local, w, layout)
        o.backward(zigzag_shard(do, rank, world))
        out.append((o.detach(), [t.grad for t in local], w.grad, comm_stats()))
    return out


def _delta_case(world):
    heads = (4, 2, 8)  # n_heads, n_kv_heads (GQA), head_dim
    t, b, c = 2 * world * 5, 2, (4 + 2 * 2) * 8
    qkv = torch.randn(b, t, c, dtype=torch.float64)
    g = -torch.rand(b, t, 4, dtype=torch.float64) * 2.0
    beta = torch.rand(b, t, 4, dtype=torch.float64)
    weight = torch.randn(c, 1, 4, dtype=torch.float64)
    do = torch.randn(b, t, 4, 8, dtype=torch.float64)
    # Chunks are 5 tokens: row 0 starts documents at 2, 10 (a chunk start) and 12 (2 tokens long);
    # row 1 has one document crossing every chunk boundary but the first.
    starts = [[0, 2, 10, 12], [0, 4]]
    cu = torch.full((b, 5), t, dtype=torch.int32)
    for row, st in enumerate(starts):
        cu[row, : len(st)] = torch.tensor(st, dtype=torch.int32)
    return _delta_worker, (qkv, g, beta, weight, do, heads, (cu, starts))


@pytest.mark.parametrize("world", [2, 4])
def test_delta_state_passing_matches_one_process(runs, world):
    """G layers: outputs and the gradients of q/k/v (pre-convolution), g, beta and the convolution
    weight equal one process (fp64); the convolution halo crosses chunk owners. The same launch runs
    packed documents (starts inside chunks, at a chunk start, one shorter than the halo, one spanning
    chunks) against each document run alone in one process."""
    from longctx.model.mixers.delta import GatedDeltaCore

    (qkv, g, beta, weight, do, heads, (_, starts)), results = runs[("delta", world)]
    b, t, c = qkv.shape
    ref_in = [x.clone().requires_grad_() for x in (qkv, g, beta, weight)]
    ref = GatedDeltaCore(*heads)(*ref_in, SeqLayout.full(t))
    ref.backward(do)
    # Packed documents in one process: each document alone (no halo, zero state).
    doc_o = torch.zeros_like(do)
    doc_grads = [torch.zeros_like(x) for x in (qkv, g, beta)] + [torch.zeros_like(weight)]
    for row, st in enumerate(starts):
        for begin, finish in zip(st, [*st[1:], t]):
            part = [x[row : row + 1, begin:finish].clone().requires_grad_() for x in (qkv, g, beta)]
            w = weight.clone().requires_grad_()
            o_doc = GatedDeltaCore(*heads)(*part, w, SeqLayout.full(finish - begin))
            o_doc.backward(do[row : row + 1, begin:finish])
            doc_o[row, begin:finish] = o_doc[0].detach()
            for acc, x in zip(doc_grads, part):
                acc[row, begin:finish] = x.grad[0]
            doc_grads[3] += w.grad
    for variant, (want_o, want_grads) in enumerate(
        [(ref.detach(), [x.grad for x in ref_in]), (doc_o, doc_grads)]
    ):
        per_rank = [r[variant] for r in results]
        o, grads = _gather([(r[0], r[1]) for r in per_rank])
        assert torch.allclose(o, want_o, atol=1e-10)
        for grad, want in zip(grads, want_grads):
            assert torch.allclose(grad, want, atol=1e-9)
        assert torch.allclose(sum(r[2] for r in per_rank), want_grads[3], atol=1e-9)
        # Forward: the halos (2 chunks x 3 tokens x C) and the maps (2 chunks x [B | A]) all-gathered;
        # backward: the same bytes reduce-scattered. Independent of T, and of the documents.
        halo = 2 * b * 3 * c * 8
        maps = 2 * b * 4 * 8 * (8 + 8) * 8  # fp64 in this test
        assert all(r[3]["bytes_sent"] == 2 * (world - 1) * (halo + maps) for r in per_rank)
    # The document check can fail: the packed documents differ from the one-document run.
    assert not torch.allclose(doc_o, ref.detach(), atol=1e-3)


def _exchange_worker(rank, world, group, full, need_by_rank, grad_full, block_size):
    from longctx.parallel.blocks import exchange_blocks

    layout = SeqLayout.zigzag(full.shape[1], rank, world)
    local = zigzag_shard(full, rank, world).clone().requires_grad_()
    reset_comm_stats()
    out, table = exchange_blocks(local, need_by_rank[rank], layout, block_size, group)
    # The gradient of the gathered blocks: the same slices of a full-sequence gradient.
    grad = torch.zeros_like(out)
    for g in range(table.shape[0]):
        for m, j in enumerate(table[g].tolist()):
            if j >= 0:
                grad[:, m * block_size : (m + 1) * block_size, g] = grad_full[
                    :, j * block_size : (j + 1) * block_size, g
                ]
    out.backward(grad)
    return out.detach(), table, local.grad, comm_stats()


def _exchange_case(world):
    bs, n_kv = 4, 3
    t = 2 * world * 3 * bs  # 3 blocks per zigzag chunk
    n_blocks = t // bs
    full = torch.randn(2, t, n_kv, 5, dtype=torch.float64)
    need = [torch.rand(n_kv, n_blocks) < 0.4 for _ in range(world)]
    grad_full = torch.randn_like(full)
    return _exchange_worker, (full, need, grad_full, bs)


@pytest.mark.parametrize("world", [2, 4])
def test_block_exchange_fetches_exactly_the_needed_blocks(runs, world):
    (full, need, grad_full, bs), results = runs[("exchange", world)]
    t, n_kv = full.shape[1], full.shape[2]
    n_blocks = t // bs
    expected_grad = torch.zeros_like(full)
    for rank, (out, table, _, _) in enumerate(results):
        for g in range(n_kv):
            ids = torch.nonzero(need[rank][g]).flatten()
            assert table[g, : len(ids)].tolist() == ids.tolist() and torch.all(table[g, len(ids) :] == -1)
            for m, j in enumerate(ids.tolist()):
                assert torch.equal(out[:, m * bs : (m + 1) * bs, g], full[:, j * bs : (j + 1) * bs, g])
                expected_grad[:, j * bs : (j + 1) * bs, g] += grad_full[:, j * bs : (j + 1) * bs, g]
    from longctx.parallel.blocks import ZigzagBlocks

    owner = ZigzagBlocks(t, world, bs).owner
    block_bytes = 2 * bs * 5 * 8
    for rank, (*_, stats) in enumerate(results):
        # Forward: the blocks I own that others need; backward: the gradients of the blocks I fetched.
        served = sum(int((need[p] & (owner == rank)).sum()) for p in range(world) if p != rank)
        fetched = int((need[rank] & (owner != rank)).sum())
        masks = (world - 1) * n_kv * n_blocks  # the all-gathered uint8 need masks
        assert stats["bytes_sent"] == (served + fetched) * block_bytes + masks
    grads = zigzag_unshard([r[2] for r in results])
    assert torch.allclose(grads, expected_grad)


NSA = dict(cmp_block=8, cmp_stride=4, slc_block=8, slc_top=5, window=12)


def _nsa_modules(d, state=None):
    from longctx.config import NSAConfig
    from longctx.model.mixers.nsa import BlockCompressor

    torch.manual_seed(1)
    comps = [BlockCompressor(d, NSA["cmp_block"], NSA["cmp_stride"]).double() for _ in range(2)]
    for comp in comps:
        comp.init_weights(0.3)
    return NSAConfig(**NSA), comps


def _nsa_worker(rank, world, group, q, k, v, gates, do):
    from longctx.parallel.nsa import ContextParallelNSACore

    cfg, (ck, cv) = _nsa_modules(q.shape[-1])
    layout = SeqLayout.zigzag(q.shape[1], rank, world)
    local = [zigzag_shard(t, rank, world).clone().requires_grad_() for t in (q, k, v, gates)]
    reset_comm_stats()
    o = ContextParallelNSACore(cfg, group)(*local, ck, cv, layout)
    o.backward(zigzag_shard(do, rank, world))
    params = [p.grad for p in (*ck.parameters(), *cv.parameters())]
    return o.detach(), [t.grad for t in local], params, comm_stats()


def _nsa_case(world):
    t, b, h, n_kv, d = 2 * world * 16, 2, 4, 2, 8  # chunks of 16 tokens: 2 selection blocks each
    q = torch.randn(b, t, h, d, dtype=torch.float64)
    k, v = torch.randn(b, t, n_kv, d, dtype=torch.float64), torch.randn(b, t, n_kv, d, dtype=torch.float64)
    gates = torch.rand(b, t, h, 3, dtype=torch.float64)
    do = torch.randn(b, t, h, d, dtype=torch.float64)
    return _nsa_worker, (q, k, v, gates, do)


@pytest.mark.parametrize("world", [2, 4])
def test_nsa_context_parallel_matches_one_process(runs, world):
    from longctx.model.mixers.nsa import NSACore

    (q, k, v, gates, do), results = runs[("nsa", world)]
    t, d = q.shape[1], q.shape[-1]
    cfg, (ck, cv) = _nsa_modules(d)
    ref_in = [x.clone().requires_grad_() for x in (q, k, v, gates)]
    ref = NSACore(cfg)(*ref_in, ck, cv, SeqLayout.full(t))
    ref.backward(do)
    o, grads = _gather([(r[0], r[1]) for r in results])
    assert torch.allclose(o, ref.detach(), atol=1e-10)
    for grad, x in zip(grads, ref_in):
        assert torch.allclose(grad, x.grad, atol=1e-10)
    # Compressor parameters: each rank holds the gradient of its own tokens; together the whole one.
    for i, p in enumerate((*ck.parameters(), *cv.parameters())):
        assert torch.allclose(sum(r[2][i] for r in results), p.grad, atol=1e-10)


def _s2_worker(rank, world, group, cfg, exchange, q, k, v, do):
    from longctx.parallel.s2 import ContextParallelS2Core

    return _run_core(rank, world, group, lambda g: ContextParallelS2Core(cfg, g, exchange), (q, k, v), do)


def _s2_case(world, n_kv, dense, exchange):
    from longctx.config import S2Config

    cfg = S2Config(block_size=4, local_blocks=2, vert_stride=4, dense_heads=dense)
    t, b, h, d = 2 * world * 3 * 4, 2, 4, 8  # 3 blocks per zigzag chunk
    q = torch.randn(b, t, h, d, dtype=torch.float64)
    k, v = torch.randn(b, t, n_kv, d, dtype=torch.float64), torch.randn(b, t, n_kv, d, dtype=torch.float64)
    do = torch.randn(b, t, h, d, dtype=torch.float64)
    return _s2_worker, (cfg, exchange, q, k, v, do)


@pytest.mark.parametrize("exchange", ["peer", "oneshot"])
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("n_kv,dense", [(4, 0), (2, 1)], ids=["mha", "gqa-dense1"])
def test_s2_context_parallel_matches_one_process(runs, world, n_kv, dense, exchange):
    """Both exchanges (`parallel.s2_exchange=peer | oneshot`), forced, equal one process in fp64."""
    from longctx.kernels.s2_attn import s2_attn_ref

    (cfg, _, q, k, v, do), results = runs[("s2", world, n_kv, dense, exchange)]
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = s2_attn_ref(*ref_in, cfg.block_size, cfg.local_blocks, cfg.vert_stride, cfg.dense_heads)
    ref.backward(do)
    o, grads = _gather(results)
    assert torch.allclose(o, ref.detach(), atol=1e-12)
    for grad, x in zip(grads, ref_in):
        assert torch.allclose(grad, x.grad, atol=1e-12)


def _counts(t, size, heads, kv_heads, **pattern):
    from longctx.config import S2Config
    from longctx.parallel.blocks import ZigzagBlocks
    from longctx.parallel.s2 import need_counts, s2_needed_blocks

    cfg = S2Config(**pattern)
    geo = ZigzagBlocks(t, size, cfg.block_size)
    need = [s2_needed_blocks(cfg, heads, kv_heads, geo.held_by(p), geo.n_blocks) for p in range(size)]
    return need_counts(torch.stack(need), geo.owner, size)


def test_s2_exchange_choice_follows_the_held_bytes():
    """auto takes one-shot where all remote blocks at once are no more than twice the largest peer
    step's buffer (a stride past the sequence: only the halo), peer by peer where the strided blocks
    spread over many peers; forcing works; a bad name is a ValueError."""
    from longctx.parallel.s2 import choose_exchange, exchange_slots

    halo_only = _counts(256, 4, 4, 1, block_size=16, local_blocks=2, vert_stride=64)
    spread = _counts(1024, 4, 8, 2, block_size=16, local_blocks=2, vert_stride=4)
    for counts, want in ((halo_only, "oneshot"), (spread, "peer")):
        oneshot, peer = exchange_slots(counts)
        size, _, n_kv = counts.shape
        # Brute force: per rank, remote blocks (padded per kv head) vs twice the largest step's buffer.
        remote = max(n_kv * max(sum(int(counts[r, o, g]) for o in range(size) if o != r) for g in range(n_kv))
                     for r in range(size))  # fmt: skip
        step = max(n_kv * int(counts[r, o].max()) for r in range(size) for o in range(size) if o != r)
        assert (oneshot, peer) == (remote, 2 * step)
        assert choose_exchange("auto", counts) == want
        assert choose_exchange("peer", counts) == "peer" and choose_exchange("oneshot", counts) == "oneshot"
    with pytest.raises(ValueError, match="auto, peer or oneshot"):
        choose_exchange("ring", halo_only)
