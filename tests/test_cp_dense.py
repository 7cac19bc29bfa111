"""Context-parallel dense attention (ring, Ulysses, all-gather) on P gloo processes against one process:
outputs and every gradient, GQA, lengths that are not powers of two, windows, the fp32 error as P
grows, and the bytes each scheme moves.

Every case runs in one spawn of 8 processes (`cases`): the P = 2 and 4 cases on process groups of the
first 2 and 4 ranks, as context-parallel groups are subgroups when there is data parallelism too. A
spawn costs each process seconds of imports; one launch instead of eleven saves most of this file's
time."""

import pytest
import torch

from longctx.kernels.flash_attn.naive import attention_ref
from longctx.parallel import SeqLayout, comm_stats, reset_comm_stats, zigzag_shard, zigzag_unshard
from tests.dist_utils import spawn

SCHEMES = ("ring", "ulysses", "allgather")


def _core(scheme, window, group):
    from longctx.parallel.context import DENSE_SCHEMES

    return DENSE_SCHEMES[scheme](window, group)


def _scheme_worker(rank, world, schemes, q, k, v, do, window, group=None):
    layout = SeqLayout.zigzag(q.shape[1], rank, world)
    results = {}
    for scheme in schemes:
        local = [zigzag_shard(t, rank, world).clone().requires_grad_() for t in (q, k, v)]
        reset_comm_stats()
        o = _core(scheme, window, group)(*local, layout)
        forward = comm_stats()
        o.backward(zigzag_shard(do, rank, world))
        total = comm_stats()
        results[scheme] = (o.detach(), [t.grad for t in local], forward, total)
    return results


def _inputs(world, n_heads, n_kv, dtype, chunk=7):
    t = 2 * world * chunk  # e.g. 28, 56: not powers of two
    shape = (2, t, n_heads, 16), (2, t, n_kv, 16)
    q = torch.randn(*shape[0], dtype=dtype)
    k, v = torch.randn(*shape[1], dtype=dtype), torch.randn(*shape[1], dtype=dtype)
    return q, k, v, torch.randn(*shape[0], dtype=dtype)


def _reference(q, k, v, do, window):
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = attention_ref(*ref_in, causal=True, window=window)
    ref.backward(do.double())
    return ref.detach(), [x.grad for x in ref_in]


WORLD = 8


def _cases_worker(rank, world, cases):
    """Run every case `(P, schemes, q, k, v, do, window)` on the process group of ranks 0..P-1."""
    import torch.distributed as dist

    sizes = sorted({case[0] for case in cases.values()})
    groups = {p: dist.new_group(list(range(p))) for p in sizes}  # every rank creates every group
    out = {}
    for key, (p, schemes, q, k, v, do, window) in cases.items():
        if rank < p:
            out[key] = _scheme_worker(rank, p, schemes, q, k, v, do, window, groups[p])
    return out


@pytest.fixture(scope="module")
def cases():
    """Inputs, references and the per-rank results of every case, from one spawn of 8 processes."""
    torch.manual_seed(0)
    inputs = {}
    for world in (2, 4):
        for n_kv in (4, 2, 1):
            window = None if n_kv != 2 else 9
            inputs[("match", world, n_kv)] = (world, SCHEMES, *_inputs(world, 4, n_kv, torch.float64), window)
    inputs["bytes"] = (4, SCHEMES, *_inputs(4, 4, 2, torch.float32, chunk=8), None)
    # The fp32 error as P grows: the same inputs on 2, 4 and 8 ranks.
    fp32 = _inputs(8, 4, 2, torch.float32, chunk=8)
    for world in (2, 4, 8):
        inputs[("fp32", world)] = (world, ("ring",), *fp32, None)
    results = spawn(_cases_worker, WORLD, (inputs,))
    return {key: (case, [r[key] for r in results[: case[0]]]) for key, case in inputs.items()}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("n_kv", [4, 2, 1], ids=["mha", "gqa2", "gqa4"])
def test_every_dense_scheme_matches_one_process(cases, world, n_kv):
    (_, _, q, k, v, do, window), results = cases[("match", world, n_kv)]
    ref, ref_grads = _reference(q, k, v, do, window)
    for scheme in SCHEMES:
        o = zigzag_unshard([r[scheme][0] for r in results])
        assert torch.allclose(o, ref, atol=1e-12), scheme
        for i, name in enumerate("qkv"):
            grad = zigzag_unshard([r[scheme][1][i] for r in results])
            assert torch.allclose(grad, ref_grads[i], atol=1e-12), f"{scheme} d{name}"


def test_bytes_each_scheme_moves(cases):
    (world, _, q, k, v, do, _), results = cases["bytes"]
    kv_shard = 2 * k.numel() // world * 4  # this rank's K and V, fp32
    qo_shard = q.numel() // world * 4
    for r in results:
        ring_fwd, ring_total = r["ring"][2]["bytes_sent"], r["ring"][3]["bytes_sent"]
        # Forward: P - 1 hops of the local K, V = (P - 1) / P of all K, V.
        assert ring_fwd == (world - 1) * kv_shard
        # Backward: K, V make the same trip, and the fp32 dK, dV of the other ranks make P - 1 hops.
        assert ring_total - ring_fwd == (world - 1) * kv_shard + (world - 1) * kv_shard
        allgather = r["allgather"][2]["bytes_sent"]
        assert allgather == ring_fwd
        # Ulysses: all-to-all of q, k, v and o, each sending (P - 1) / P of its shard; the 2 kv heads are
        # replicated to 4 so each of the 4 ranks has one, so k and v each move as much as q here.
        ulysses = r["ulysses"][2]["bytes_sent"]
        assert ulysses == (world - 1) * 4 * qo_shard // world


def test_ring_fp32_error_does_not_grow_with_ranks(cases):
    """Max error against fp64 for P = 1 (one device), 2, 4 and 8: all at fp32 rounding."""
    (_, _, q, k, v, do, _), _ = cases[("fp32", 8)]
    ref, ref_grads = _reference(q, k, v, do, None)
    single = attention_ref(q, k, v)
    errors = {1: (single.double() - ref).abs().max().item()}
    for world in (2, 4, 8):
        _, results = cases[("fp32", world)]
        o = zigzag_unshard([r["ring"][0] for r in results])
        dq = zigzag_unshard([r["ring"][1][0] for r in results])
        errors[world] = max(
            (o.double() - ref).abs().max().item(), (dq.double() - ref_grads[0]).abs().max().item()
        )
    print("ring max |error| vs fp64 by P:", errors)
    assert all(e < 5e-6 for e in errors.values()), errors
    assert errors[8] < 4 * max(errors[1], 1e-7), errors


def test_ulysses_rejects_heads_that_do_not_divide():
    from longctx.parallel.ulysses import check_heads

    assert check_heads(8, 2, 4) == 2 and check_heads(8, 8, 4) == 1
    with pytest.raises(ValueError, match="6 query heads do not divide over parallel.cp=4"):
        check_heads(6, 6, 4)
    with pytest.raises(ValueError, match="3 kv heads and parallel.cp=2"):
        check_heads(6, 3, 2)
