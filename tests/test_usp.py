"""Ulysses x ring (USP) for D and S layers, and `parallel.deterministic`, in one 8-process gloo launch.

One spawn of 8 processes runs every case (process start-up dominates on 2 cores): USP at cp=8 with
U=2 and U=4 over the whole world, and at cp=4 with U=2 and U=4 over two context-parallel groups of
4 ranks at once (ranks 0-3 and 4-7, as with data parallelism), packed documents included. Each is
checked in fp64 against the one-process reference attention, forward and every gradient. Then an
`LD` model at cp=2 (four groups of 2) with `deterministic=True`, run twice: bit-identical gradients.
Last, every rank's counted bytes of one layer per scheme at cp=8 (`bench.comm`), which the scale
model (`bench.scale.plan_bytes`) must predict exactly.
"""

import pytest
import torch
import torch.distributed as dist

from longctx.config import S2Config
from longctx.kernels.flash_attn.naive import attention_ref
from longctx.kernels.s2_attn.naive import s2_attn_ref
from longctx.parallel import SeqLayout, zigzag_shard, zigzag_unshard
from longctx.parallel.layout import Documents
from tests.dist_utils import spawn

T, H, H_KV, D = 64, 8, 2, 8
S2 = dict(block_size=4, local_blocks=2, vert_stride=4, dense_heads=1)
# (cp, ulysses_size, documents): cp=8 over the world; cp=4 as two groups of 4 ranks.
CASES = [(8, 2, False), (8, 4, False), (4, 2, True), (4, 4, True)]
CU = torch.tensor([[0, 13, 40, 64], [0, 30, 64, 64]], dtype=torch.int32)


def _inputs():
    torch.manual_seed(0)
    q = torch.randn(2, T, H, D, dtype=torch.float64)
    k, v = torch.randn(2, 2, T, H_KV, D, dtype=torch.float64)
    return q, k, v, torch.randn(2, T, H, D, dtype=torch.float64)


def _doc_mask(cu):
    pos = torch.arange(T)
    doc = torch.stack([torch.bucketize(pos, row[1:].long(), right=True) for row in cu])  # [B, T]
    return (doc[:, :, None] == doc[:, None, :])[:, None]  # [B, 1, T, T]


def _reference(letter, docs):
    q, k, v, do = _inputs()
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    if letter == "D":
        o = attention_ref(*ref_in, causal=True, mask=_doc_mask(CU) if docs else None)
    else:
        o = s2_attn_ref(*ref_in, **S2, cu_seqlens=CU if docs else None)
    o.backward(do)
    return o.detach(), [x.grad for x in ref_in]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _deterministic_ld(rank, group, size):
    from longctx.config import load_config
    from longctx.model import build_model
    from longctx.parallel import parallelize_model

    cfg = load_config("configs/tiny.yaml", ["model.layers=LD", "model.n_layers=2", "model.dim=32"]).model
    torch.manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (1, 32))
    runs = []
    for _ in range(2):
        model = build_model(cfg, seed=0)
        parallelize_model(model, group, "ring", deterministic=True)
        layout = SeqLayout.zigzag(32, dist.get_rank(group), size)
        logits = model(zigzag_shard(tokens, dist.get_rank(group), size), layout)
        logits.float().square().mean().backward()
        runs.append(_grads(model))
    return runs


def _worker(rank, world):
    from longctx.parallel.ring import RingDenseCore
    from longctx.parallel.usp import UspDenseCore, UspGroups, UspS2Core

    q, k, v, do = _inputs()
    # Every rank creates every group, in one order.
    quads = [dist.new_group(list(range(i, i + 4))) for i in (0, 4)]
    pairs = [dist.new_group([i, i + 1]) for i in range(0, 8, 2)]
    results = {}
    for cp, u, docs in CASES:
        group = None if cp == world else quads[rank // 4]
        cp_rank = rank % cp
        groups = UspGroups(group, u)
        layout = SeqLayout.zigzag(T, cp_rank, cp)
        if docs:
            layout = layout.with_docs(Documents(CU))
        for letter, core in (("D", UspDenseCore(None, groups)), ("S", UspS2Core(S2Config(**S2), groups))):
            local = [zigzag_shard(t, cp_rank, cp).clone().requires_grad_() for t in (q, k, v)]
            o = core(*local, layout)
            o.backward(zigzag_shard(do, cp_rank, cp))
            results[(cp, u, docs, letter)] = (cp_rank, o.detach(), [t.grad for t in local])
    # A ring of one rank (what USP runs when every rank is its own ring group): its own gradients.
    singles = [dist.new_group([i]) for i in range(world)]
    local = [t.clone().requires_grad_() for t in (q, k, v)]
    o = RingDenseCore(None, singles[rank])(*local, SeqLayout.zigzag(T, 0, 1))
    o.backward(do)
    results["ring of one"] = (o.detach(), [t.grad for t in local])
    results["deterministic"] = _deterministic_ld(rank, pairs[rank // 2], 2)
    results["bytes"] = _counted_bytes(rank, world)
    return results


BYTES_T = 256
MEASURED = [("D", "ring"), ("D", "ulysses"), ("D", "allgather"), ("S", "pattern"), ("L", "state")]


def _bytes_model():
    from longctx.config import load_config

    overrides = ["model.dim=64", "model.n_heads=8", "model.n_kv_heads=2", "model.s2.block_size=16"]
    overrides += ["model.s2.local_blocks=2", "model.s2.vert_stride=4", "model.s2.dense_heads=1"]
    return load_config(None, overrides).model


def _counted_bytes(rank, world):
    from longctx.bench.comm import _measure

    return {
        f"{letter} {scheme}": _measure(letter, scheme, _bytes_model(), rank, world, BYTES_T, 1)
        for letter, scheme in MEASURED
    }


@pytest.fixture(scope="module")
def results():
    return spawn(_worker, 8)


def test_scale_model_bytes_equal_counted_gloo_bytes(results):
    from longctx.bench.scale import plan_bytes

    model = _bytes_model()
    for rank in range(8):
        for name, (fwd, bwd) in results[rank]["bytes"].items():
            phases = plan_bytes(model, name, BYTES_T, 8, rank, itemsize=4)
            predicted = [
                sum(sum(p.by_peer.values()) for p in phases if p.backward == back) for back in (False, True)
            ]
            assert predicted == [fwd, bwd], f"{name} rank {rank}: model {predicted}, counted {[fwd, bwd]}"


def test_usp_and_deterministic_match_one_process(results):
    for cp, u, docs in CASES:
        for letter in "DS":
            ref, ref_grads = _reference(letter, docs)
            for first in range(0, 8, cp):
                shards = [results[r][(cp, u, docs, letter)] for r in range(first, first + cp)]
                assert [s[0] for s in shards] == list(range(cp))
                where = f"{letter} cp={cp} U={u} docs={docs} ranks {first}-{first + cp - 1}"
                o = zigzag_unshard([s[1] for s in shards])
                assert torch.allclose(o, ref, atol=1e-12), where
                for i, name in enumerate("qkv"):
                    grad = zigzag_unshard([s[2][i] for s in shards])
                    assert torch.allclose(grad, ref_grads[i], atol=1e-12), f"d{name} {where}"
    ref, ref_grads = _reference("D", False)
    o, grads = results[0]["ring of one"]
    assert torch.allclose(o, ref, atol=1e-12)
    assert all(torch.allclose(g, r, atol=1e-12) for g, r in zip(grads, ref_grads))
    for rank in range(8):
        first, second = results[rank]["deterministic"]
        assert first.keys() == second.keys() and len(first) > 0
        for name in first:
            assert torch.equal(first[name], second[name]), f"rank {rank}: {name} differs between runs"


@pytest.mark.parametrize(
    "heads,kv,dense,stride,local,size",
    [(8, 2, 1, 4, 2, 4), (4, 4, 0, 16, 8, 2), (16, 4, 2, 8, 3, 8), (6, 3, 0, 5, 1, 3)],
    ids=["gqa-dense", "mha-wide", "h16", "odd"],
)
def test_s2_need_closed_form_equals_needed_blocks(heads, kv, dense, stride, local, size):
    from longctx.bench.scale import s2_need_closed_form
    from longctx.parallel.blocks import ZigzagBlocks
    from longctx.parallel.s2 import s2_needed_blocks

    cfg = S2Config(block_size=16, local_blocks=local, vert_stride=stride, dense_heads=dense)
    geo = ZigzagBlocks(16 * 2 * size * 5, size, 16)
    for rank in range(size):
        q_ids = geo.held_by(rank)
        expected = s2_needed_blocks(cfg, heads, kv, q_ids, geo.n_blocks)
        assert torch.equal(s2_need_closed_form(cfg, heads, kv, q_ids, geo.n_blocks), expected), rank


def test_usp_config_says_what_divides():
    from longctx.config import ConfigError, load_config

    cfg = load_config(None, ["parallel.cp=8", "parallel.cp_comm=usp", "parallel.ulysses_size=4"])
    assert (cfg.parallel.ulysses_size, cfg.parallel.deterministic) == (4, False)
    with pytest.raises(ConfigError, match="must divide parallel.cp=8"):
        load_config(None, ["parallel.cp=8", "parallel.cp_comm=usp", "parallel.ulysses_size=3"])
    with pytest.raises(ConfigError, match="only used with parallel.cp_comm=usp"):
        load_config(None, ["parallel.cp=8", "parallel.ulysses_size=2"])
    from longctx.parallel.ulysses import check_heads

    with pytest.raises(ValueError, match="6 query heads do not divide over parallel.ulysses_size=4"):
        check_heads(6, 2, 4, "usp", "parallel.ulysses_size")
    assert check_heads(8, 2, 4, "usp", "parallel.ulysses_size") == 2
