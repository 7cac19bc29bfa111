"""Packed documents stay apart: the batch's boundaries, per-document positions, every mixer core under
context parallelism (P = 2 and 4 gloo processes, fp64 reference path) against one process and against
each document alone, a model whose outputs for one document ignore another, and training.

Documents (T = 128): row 0 has one shorter than a block, one starting at a CP chunk's first token
(position 32: chunk 2 at P = 4, chunk 1 at P = 2) and one longer than a chunk; row 1 is one document.
Run: `.venv/bin/python -m pytest tests/test_documents.py`.
"""

import itertools

import pytest
import torch

from longctx.config import ConfigError, load_config
from longctx.parallel import SeqLayout, zigzag_shard, zigzag_unshard
from longctx.parallel.layout import Documents
from tests.conftest import rel_err
from tests.dist_utils import losses, metrics, run_many, spawn

T = 128
LENGTHS = [[5, 27, 3, 50, 43], [T]]
S2 = dict(block_size=8, local_blocks=2, vert_stride=4)
NSA = dict(cmp_block=8, cmp_stride=4, slc_block=8, slc_top=5, window=12)
TOL = 1e-10


def cu_seqlens(lengths=LENGTHS) -> torch.Tensor:
    starts = torch.zeros(len(lengths), sum(lengths[0]), dtype=torch.bool)
    for b, row in enumerate(lengths):
        starts[b, list(itertools.accumulate([0, *row[:-1]]))] = True
    return Documents.from_starts(starts).cu_seqlens


def documents(lengths=LENGTHS):
    for b, row in enumerate(lengths):
        for start, n in zip(itertools.accumulate([0, *row[:-1]]), row):
            yield b, start, n


def test_documents_from_sampler_starts():
    starts = torch.zeros(2, 10, dtype=torch.bool)
    starts[0, [3, 7]] = True  # token 0 always starts a document, marked or not
    starts[1, 0] = True
    docs = Documents.from_starts(starts, per_doc_positions=True)
    assert docs.cu_seqlens.tolist() == [[0, 3, 7, 10], [0, 10, 10, 10]]
    assert docs.num_docs().tolist() == [3, 1]
    assert docs.rope_positions(torch.arange(4, 9)).tolist() == [[1, 2, 3, 0, 1], [4, 5, 6, 7, 8]]
    # The earliest key any of the queries sees, over every sequence of the batch.
    assert docs.first_visible(8, 2) == 0
    assert Documents(docs.cu_seqlens[:1]).first_visible(8, 2) == 7
    with pytest.raises(ValueError, match="start at 0"):
        Documents(torch.tensor([[1, 10]], dtype=torch.int32))
    with pytest.raises(ValueError, match="10-token"):
        SeqLayout.full(12).with_docs(docs)


def test_doc_config_keys():
    cfg = load_config("configs/tiny.yaml", [])
    assert cfg.data.doc_mask is True and cfg.data.doc_positions == "global"
    with pytest.raises(ConfigError, match="data.doc_positions"):
        load_config("configs/tiny.yaml", ["data.doc_positions=local"])


def _cores():
    """Single-process cores and their context-parallel versions, by name (letters D, S, N, L)."""
    from longctx.config import NSAConfig, S2Config
    from longctx.model.mixers.attention import DenseCore, S2Core
    from longctx.model.mixers.linear import LinearCore
    from longctx.model.mixers.nsa import NSACore
    from longctx.parallel.dense import AllGatherDenseCore
    from longctx.parallel.linear import StatePassingLinearCore
    from longctx.parallel.nsa import ContextParallelNSACore
    from longctx.parallel.ring import RingDenseCore
    from longctx.parallel.s2 import ContextParallelS2Core
    from longctx.parallel.ulysses import UlyssesDenseCore

    s2, nsa = S2Config(**S2), NSAConfig(**NSA)
    return {
        "D-ring": (DenseCore(None), lambda: RingDenseCore(None, None)),
        "D-ring-window": (DenseCore(20), lambda: RingDenseCore(20, None)),
        "D-ulysses": (DenseCore(None), lambda: UlyssesDenseCore(None, None)),
        "D-allgather": (DenseCore(20), lambda: AllGatherDenseCore(20, None)),
        "S": (S2Core(s2), lambda: ContextParallelS2Core(s2, None)),
        "N": (NSACore(nsa), lambda: ContextParallelNSACore(nsa, None)),
        "L": (LinearCore(), lambda: StatePassingLinearCore(None)),
    }


def _inputs(name):
    torch.manual_seed(0)
    b, h, n_kv, d = 2, 4, 2, 8
    q = torch.randn(b, T, h, d, dtype=torch.float64)
    if name == "L":
        k, v = (torch.randn(b, T, h, d, dtype=torch.float64) for _ in range(2))
        return [q, k, v, -torch.rand(b, T, h, dtype=torch.float64)], {}
    k, v = (torch.randn(b, T, n_kv, d, dtype=torch.float64) for _ in range(2))
    if name == "N":
        from longctx.model.mixers.nsa import BlockCompressor

        comps = [BlockCompressor(d, NSA["cmp_block"], NSA["cmp_stride"]).double() for _ in range(2)]
        for comp in comps:
            comp.init_weights(0.3)
        return [q, k, v, torch.rand(b, T, h, 3, dtype=torch.float64)], {"modules": comps}
    return [q, k, v], {}


def _run(core, name, layout, shard=lambda x: x):
    inputs, extra = _inputs(name)
    local = [shard(x).clone().requires_grad_() for x in inputs]
    o = core(*local, *extra.get("modules", ()), layout)
    torch.manual_seed(1)
    do = torch.randn(o.shape[0], T, *o.shape[2:], dtype=o.dtype)
    o.backward(shard(do))
    params = [p.grad for m in extra.get("modules", ()) for p in m.parameters()]
    return o.detach(), [x.grad for x in local], params


def _cp_worker(rank, world):
    out = {}
    docs = Documents(cu_seqlens())
    layout = SeqLayout.zigzag(T, rank, world).with_docs(docs)
    for name, (_, make) in _cores().items():
        if world == 4 and name in ("D-ulysses", "D-allgather", "D-ring-window"):
            continue  # the other dense schemes and windows are covered at P = 2 (keeps the suite short)
        out[name] = _run(make(), name, layout, lambda x: zigzag_shard(x, rank, world))
    return out


def _one_process(name, core):
    layout = SeqLayout.full(T).with_docs(Documents(cu_seqlens()))
    return _run(core, name, layout)


@pytest.fixture(scope="module")
def one_process():
    return {name: _one_process(name, core) for name, (core, _) in _cores().items()}


@pytest.mark.parametrize("world", [2, 4])
def test_every_core_with_documents_matches_one_process(world, one_process):
    results = spawn(_cp_worker, world)
    for name in results[0]:
        o = zigzag_unshard([r[name][0] for r in results])
        grads = [zigzag_unshard([r[name][1][i] for r in results]) for i in range(len(results[0][name][1]))]
        ref_o, ref_grads, ref_params = one_process[name]
        assert rel_err(o, ref_o) < TOL, name
        for g, r in zip(grads, ref_grads):
            assert rel_err(g, r) < TOL, name
        for i, ref in enumerate(ref_params):
            # Parameter gradients are per rank: their sum is the whole sequence's.
            assert rel_err(sum(r[name][2][i] for r in results), ref) < TOL, name


@pytest.mark.parametrize("name", ["D-ring", "D-ring-window", "L"])
def test_packed_core_matches_each_document_alone(name, one_process):
    core = _cores()[name][0]
    inputs, _ = _inputs(name)
    ref_o, ref_grads, _ = one_process[name]
    torch.manual_seed(1)
    do = torch.randn(ref_o.shape, dtype=ref_o.dtype)
    for b, start, n in documents():
        part = [x[b : b + 1, start : start + n].clone().requires_grad_() for x in inputs]
        o = core(*part, SeqLayout.full(n))
        o.backward(do[b : b + 1, start : start + n])
        assert rel_err(ref_o[b : b + 1, start : start + n], o.detach()) < TOL, (name, start)
        for g, x in zip(ref_grads, part):
            assert rel_err(g[b : b + 1, start : start + n], x.grad) < TOL, (name, start)
