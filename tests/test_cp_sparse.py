"""S and N layers under context parallelism at scale-relevant properties, in one 4-process gloo launch:

- memory: at P = 4 each rank saves for the backward at most 1.3 x (one process's bytes) / 4 plus the
  halo (N: the all-gathered compressed tokens and window tails), counted by
  `torch.autograd.graph.saved_tensors_hooks` with the Triton wrappers (kernels' own saved tensors
  included; the kernels themselves are no-op launches: saved bytes depend on shapes only);
- no host sync: ranks 0 and 1 run the second training step (forward and backward) of an `LSND` model
  at cp=2 with the Triton wrappers under the `TorchDispatchMode` of tests/test_kernel_safety.py;
- determinism: ranks 2 and 3 (a cp=2 subgroup, so peers are not global ranks 0 and 1) run the S and N
  cores twice with `parallel.deterministic=true`'s paths and get bit-identical gradients, which also
  match one process.
"""

import contextlib
import importlib
import os
import traceback

import pytest
import torch
import torch.distributed as dist

from longctx.parallel import SeqLayout, zigzag_shard
from tests.dist_utils import spawn

S2 = dict(block_size=16, local_blocks=2, vert_stride=4, dense_heads=0)
NSA = dict(cmp_block=16, cmp_stride=8, slc_block=16, slc_top=4, window=24)
T, B, H, H_KV, D = 1024, 1, 4, 2, 16


class SavedBytes:
    """Bytes of the distinct storages autograd saves for the backward while active."""

    def __init__(self):
        self.seen, self.bytes = set(), 0

    def pack(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.seen:
            self.seen.add(storage.data_ptr())
            self.bytes += storage.nbytes()
        return t

    @contextlib.contextmanager
    def counting(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield self


@contextlib.contextmanager
def no_kernel_launches():
    """The Triton wrappers run (interpreter mode, CPU tensors), their kernels do nothing."""
    from longctx import kernels as K
    from tests.test_kernel_safety import KERNELS, _NoLaunch

    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    saved = []
    for module_name, names in KERNELS.items():
        module = importlib.import_module(module_name)
        for name in names:
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, _NoLaunch())
    try:
        with K.backend("triton"):
            yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g, dtype=dtype)
    k, v = (torch.randn(B, T, H_KV, D, generator=g, dtype=dtype) for _ in range(2))
    gates = torch.rand(B, T, H, 3, generator=g, dtype=dtype)
    return q, k, v, gates


def _cores(dtype):
    from longctx.config import NSAConfig, S2Config
    from longctx.model.mixers.nsa import BlockCompressor

    torch.manual_seed(1)
    comps = [BlockCompressor(D, NSA["cmp_block"], NSA["cmp_stride"]).to(dtype) for _ in range(2)]
    for comp in comps:
        comp.init_weights(0.3)
    return S2Config(**S2), NSAConfig(**NSA), comps


def _saved_bytes(world, rank, group=None):
    """(S bytes, N bytes) one rank saves for one layer's backward (world 1: the single-process cores)."""
    from longctx.model.mixers.attention import S2Core
    from longctx.model.mixers.nsa import NSACore
    from longctx.parallel.nsa import ContextParallelNSACore
    from longctx.parallel.s2 import ContextParallelS2Core

    s2_cfg, nsa_cfg, (ck, cv) = _cores(torch.float32)
    if world == 1:
        layout = SeqLayout.full(T)
        s_core, n_core = S2Core(s2_cfg), NSACore(nsa_cfg)
        local = [x.requires_grad_() for x in _inputs()]
    else:
        layout = SeqLayout.zigzag(T, rank, world)
        s_core, n_core = ContextParallelS2Core(s2_cfg, group), ContextParallelNSACore(nsa_cfg, group)
        local = [zigzag_shard(x, rank, world).clone().requires_grad_() for x in _inputs()]
    q, k, v, gates = local
    with no_kernel_launches():
        with SavedBytes().counting() as s_bytes:
            s_core(q, k, v, layout)
        with SavedBytes().counting() as n_bytes:
            n_core(q, k, v, gates, ck, cv, layout)
    return s_bytes.bytes, n_bytes.bytes


def _run_sn(rank, world, group, dtype=torch.float64):
    """Outputs and gradients of one S core and one N core at cp=`world` on this rank's shard."""
    from longctx.parallel.nsa import ContextParallelNSACore
    from longctx.parallel.s2 import ContextParallelS2Core

    s2_cfg, nsa_cfg, (ck, cv) = _cores(dtype)
    layout = SeqLayout.zigzag(T // 4, rank, world)
    full = [x[:, : T // 4] for x in _inputs(dtype)]
    q, k, v, gates = (zigzag_shard(x, rank, world).clone().requires_grad_() for x in full)
    o_s = ContextParallelS2Core(s2_cfg, group)(q, k, v, layout)
    o_n = ContextParallelNSACore(nsa_cfg, group)(q, k, v, gates, ck, cv, layout)
    g = torch.Generator().manual_seed(5)
    do_s, do_n = (zigzag_shard(torch.randn(o.shape[0], T // 4, *o.shape[2:], generator=g, dtype=dtype), rank,
                               world) for o in (o_s, o_n))  # fmt: skip
    ((o_s * do_s).sum() + (o_n * do_n).sum()).backward()
    params = [p.grad.clone() for p in (*ck.parameters(), *cv.parameters())]
    return [t.grad.clone() for t in (q, k, v, gates)] + params


def _sync_check(rank, group):
    """Host-sync ops recorded during the second step of an LSND model at cp=2 (forward and backward)."""
    from longctx.config import ModelConfig, NSAConfig, S2Config
    from longctx.model.transformer import build_model
    from longctx.parallel.context import parallelize_model
    from tests.test_kernel_safety import SyncRecorder

    cfg = ModelConfig(
        vocab_size=64, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, layers="LSND",
        s2=S2Config(**S2), nsa=NSAConfig(**NSA),
    )  # fmt: skip
    model = parallelize_model(build_model(cfg, seed=0), group, "ring")
    seq = 256
    layout = SeqLayout.zigzag(seq, rank, 2)
    tokens = zigzag_shard(torch.randint(0, 64, (1, seq), generator=torch.Generator().manual_seed(3)), rank, 2)

    class Where(SyncRecorder):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            n = len(self.bad)
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if len(self.bad) > n:
                frames = [f for f in traceback.extract_stack() if "/tests/" not in f.filename]
                self.bad[-1] += " at " + " <- ".join(f"{f.filename}:{f.lineno}" for f in frames[-3:])
            return out

    with no_kernel_launches():
        for step in range(2):
            recorder = Where() if step == 1 else contextlib.nullcontext()
            with recorder:
                model(tokens, layout).float().sum().backward()
    return recorder.bad


def _worker(rank, world):
    result = {"bytes": None, "sync": None, "grads": None}
    pair_a, pair_b = dist.new_group([0, 1]), dist.new_group([2, 3])
    if rank < 2:
        result["sync"] = _sync_check(rank, pair_a)
    else:
        from longctx import kernels as K

        with K.backend("naive"):
            first = _run_sn(rank - 2, 2, pair_b)
            second = _run_sn(rank - 2, 2, pair_b)
        result["grads"] = (first, second)
    dist.barrier()
    result["bytes"] = _saved_bytes(world, rank)
    return result


def _one_process_grads(dtype=torch.float64):
    from longctx.kernels.s2_attn import s2_attn_ref
    from longctx.model.mixers.nsa import NSACore

    s2_cfg, nsa_cfg, (ck, cv) = _cores(dtype)
    full = [x[:, : T // 4].clone().requires_grad_() for x in _inputs(dtype)]
    q, k, v, gates = full
    o_s = s2_attn_ref(q, k, v, *S2.values())
    o_n = NSACore(nsa_cfg)(q, k, v, gates, ck, cv, SeqLayout.full(T // 4))
    g = torch.Generator().manual_seed(5)
    do_s, do_n = (torch.randn(o.shape, generator=g, dtype=dtype) for o in (o_s, o_n))
    ((o_s * do_s).sum() + (o_n * do_n).sum()).backward()
    return [t.grad for t in full] + [p.grad for p in (*ck.parameters(), *cv.parameters())]


@pytest.fixture(scope="module")
def results():
    return spawn(_worker, 4)


def test_s_and_n_save_a_quarter_per_rank_at_p4(results):
    s_one, n_one = _saved_bytes(1, 0)
    # N's halo: the whole sequence's compressed keys and values (all-gathered, saved by the compressed
    # attention) and the chunk tails the compression windows reach back into, at fp32.
    compressed = B * (T // NSA["cmp_stride"]) * 2 * H_KV * D * 4
    tails = 4 * 2 * B * (NSA["cmp_block"] - NSA["cmp_stride"]) * 2 * H_KV * D * 4  # [P, 2 chunks, ...]
    halo_n = compressed + tails
    for rank, r in enumerate(results):
        s_p4, n_p4 = r["bytes"]
        print(f"rank {rank}: S {s_p4} B (P=1 {s_one} B), N {n_p4} B (P=1 {n_one} B, halo {halo_n} B)")
        assert s_p4 <= 1.3 * s_one / 4, (rank, s_p4, s_one)
        assert n_p4 <= 1.3 * n_one / 4 + halo_n, (rank, n_p4, n_one, halo_n)


def test_no_host_sync_in_the_second_step_of_an_lsnd_model_at_cp2(results):
    for rank in (0, 1):
        bad = results[rank]["sync"]
        assert not bad, f"rank {rank}: host synchronisation in step 2:\n" + "\n".join(bad)


def test_s_and_n_gradients_are_bit_identical_run_to_run_and_match_one_process(results):
    from longctx.parallel import zigzag_unshard

    for r in results[2:]:
        first, second = r["grads"]
        for a, b in zip(first, second):
            assert torch.equal(a, b)
    ref = _one_process_grads()
    n_sharded = 4  # q, k, v, gates are sharded; compressor parameters are summed over ranks
    for i, expected in enumerate(ref):
        per_rank = [results[2]["grads"][0][i], results[3]["grads"][0][i]]
        got = zigzag_unshard(per_rank) if i < n_sharded else per_rank[0] + per_rank[1]
        assert torch.allclose(got, expected, atol=1e-10), i
