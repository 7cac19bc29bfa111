"""Context parallelism for S, N and L layers: each core on P = 2 and 4 gloo processes against one
process (fp64), outputs and every gradient, and the bytes each moves."""

import pytest
import torch

from longctx.kernels.gla.naive import gla_recurrent_ref
from longctx.parallel import SeqLayout, comm_stats, reset_comm_stats, zigzag_shard, zigzag_unshard
from tests.dist_utils import spawn


def _run_core(rank, world, core_fn, inputs, do):
    layout = SeqLayout.zigzag(inputs[0].shape[1], rank, world)
    local = [zigzag_shard(t, rank, world).clone().requires_grad_() for t in inputs]
    reset_comm_stats()
    o = core_fn()(*local, layout)
    o.backward(zigzag_shard(do, rank, world))
    return o.detach(), [t.grad for t in local], comm_stats()


def _gather(results):
    o = zigzag_unshard([r[0] for r in results])
    grads = [zigzag_unshard([r[1][i] for r in results]) for i in range(len(results[0][1]))]
    return o, grads


def _linear_core():
    from longctx.parallel.linear import StatePassingLinearCore

    return StatePassingLinearCore(None)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("decay", ["weak", "strong"])
def test_linear_state_passing_matches_one_process(world, decay):
    t, b, h, d = 8 * world * 5, 2, 3, 8
    q, k, v = (torch.randn(b, t, h, d, dtype=torch.float64) for _ in range(3))
    g = -torch.rand(b, t, h, dtype=torch.float64) * (20.0 if decay == "strong" else 0.5)
    do = torch.randn(b, t, h, d, dtype=torch.float64)
    ref_in = [x.clone().requires_grad_() for x in (q, k, v, g)]
    ref, _ = gla_recurrent_ref(*ref_in)
    ref.backward(do)
    results = spawn(_run_core, world, (_linear_core, (q, k, v, g), do))
    o, grads = _gather(results)
    assert torch.allclose(o, ref.detach(), atol=1e-10)
    for grad, x in zip(grads, ref_in):
        assert torch.allclose(grad, x.grad, atol=1e-9)
    # One all-gather of 2 chunks x (state + decay) forward, one reduce-scatter back: independent of T.
    per_rank = 2 * b * h * (d * d + 1) * 8  # fp64 in this test
    assert all(r[2]["bytes_sent"] == 2 * (world - 1) * per_rank for r in results)
