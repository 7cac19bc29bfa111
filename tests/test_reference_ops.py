"""The plain PyTorch references of every mixer against brute force: explicit per-query loops in fp64
that follow DESIGN.md's formulas directly, sharing no code with the references."""

import math

import pytest
import torch

from longctx.kernels.flash_attn.naive import attention_ref, merge_partials_ref
from longctx.kernels.gla.naive import gla_chunk_ref, gla_recurrent_ref, gla_step_ref
from longctx.kernels.nsa.naive import (
    cmp_attn_ref,
    compress_ref,
    num_cmp_blocks,
    select_attn_ref,
    select_blocks_ref,
)
from longctx.kernels.s2_attn.naive import s2_attn_ref, s2_block_mask
from tests.conftest import rel_err


def brute_attention(q, k, v, allowed, scale=None):
    """Per (batch, head, query) softmax over the keys `allowed(b, h, i, j)` says it may see."""
    b_, tq, h_, d = q.shape
    tk, h_kv = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    o = torch.zeros(b_, tq, h_, d, dtype=torch.float64)
    lse = torch.full((b_, h_, tq), -math.inf, dtype=torch.float64)
    for b in range(b_):
        for h in range(h_):
            kv = h // (h_ // h_kv)
            for i in range(tq):
                keys = [j for j in range(tk) if allowed(b, h, i, j)]
                if not keys:
                    continue
                s = torch.stack([(q[b, i, h] * k[b, j, kv]).sum() * scale for j in keys])
                lse[b, h, i] = torch.logsumexp(s, 0)
                p = torch.softmax(s, 0)
                o[b, i, h] = sum(p[n] * v[b, j, kv] for n, j in enumerate(keys))
    return o, lse


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 5), (False, 4)], ids=str)
@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (4, 2), (4, 1)], ids=lambda x: f"H{x}")
def test_attention_ref_matches_brute_force(causal, window, n_heads, n_kv):
    q, k, v = rand(2, 13, n_heads, 8), rand(2, 13, n_kv, 8), rand(2, 13, n_kv, 8)

    def allowed(b, h, i, j):
        return (not causal or j <= i) and (window is None or j > i - window)

    o, lse = attention_ref(q, k, v, causal=causal, window=window, return_lse=True)
    o_bf, lse_bf = brute_attention(q, k, v, allowed)
    assert rel_err(o, o_bf) < 1e-12 and rel_err(lse, lse_bf) < 1e-12


def test_attention_ref_chunk_pairs_and_merge_equal_whole():
    """A query chunk against every key chunk at global offsets, merged by lse, equals one call."""
    t, c = 24, 8
    q, k, v = rand(1, t, 2, 8), rand(1, t, 2, 8), rand(1, t, 2, 8)
    whole, whole_lse = attention_ref(q, k, v, return_lse=True)
    for qs in range(0, t, c):
        parts = [
            attention_ref(
                q[:, qs : qs + c],
                k[:, ks : ks + c],
                v[:, ks : ks + c],
                return_lse=True,
                q_offset=qs,
                k_offset=ks,
            )
            for ks in range(0, t, c)
        ]
        # Chunks after the queries see no key: zero output and lse -inf, dropped by the merge.
        assert all(torch.isinf(l).all() for (_, l), ks in zip(parts, range(0, t, c)) if ks > qs)
        o, lse = merge_partials_ref([p[0] for p in parts], [p[1] for p in parts])
        assert rel_err(o, whole[:, qs : qs + c]) < 1e-12
        assert rel_err(lse, whole_lse[..., qs : qs + c]) < 1e-12


def test_attention_ref_gradients_finite_for_empty_rows():
    q, k, v = (rand(1, 4, 1, 4).requires_grad_() for _ in range(3))
    o = attention_ref(q, k, v, q_offset=0, k_offset=8)  # every key after every query
    o.sum().backward()
    assert torch.all(o == 0) and all(torch.isfinite(x.grad).all() for x in (q, k, v))


def s2_allowed_formula(h, n_heads, qb, kb, local_blocks, vert_stride, dense_heads):
    head_step = max(1, vert_stride // n_heads)
    if kb > qb:
        return False
    if h >= n_heads - dense_heads:
        return True
    return qb - kb < local_blocks or (kb + 1 + h * head_step) % vert_stride == 0


@pytest.mark.parametrize(
    "t,bs,local,stride,n_heads,n_kv,dense",
    [(37, 4, 1, 3, 4, 2, 0), (40, 8, 2, 2, 2, 2, 1), (29, 4, 2, 4, 4, 1, 0), (50, 4, 1, 8, 4, 4, 0)],
    ids=lambda x: str(x),
)
def test_s2_ref_matches_explicit_mask(t, bs, local, stride, n_heads, n_kv, dense):
    q, k, v = rand(1, t, n_heads, 8), rand(1, t, n_kv, 8), rand(1, t, n_kv, 8)

    def allowed(b, h, i, j):
        return j <= i and s2_allowed_formula(h, n_heads, i // bs, j // bs, local, stride, dense)

    o, lse = s2_attn_ref(q, k, v, bs, local, stride, dense, return_lse=True)
    o_bf, lse_bf = brute_attention(q, k, v, allowed)
    assert rel_err(o, o_bf) < 1e-12 and rel_err(lse, lse_bf) < 1e-12


def test_s2_ref_at_global_offsets_equals_rows_of_whole():
    t, bs = 64, 8
    q, k, v = rand(1, t, 4, 8), rand(1, t, 4, 8), rand(1, t, 4, 8)
    whole = s2_attn_ref(q, k, v, bs, 2, 4)
    part = s2_attn_ref(q[:, 40:], k, v, bs, 2, 4, q_offset=40)
    assert rel_err(part, whole[:, 40:]) < 1e-12


@pytest.mark.parametrize("n_heads,stride", [(4, 4), (8, 4), (8, 8), (16, 8)])
def test_s2_union_of_heads_covers_every_causal_block(n_heads, stride):
    n = 40
    ids = torch.arange(n)
    mask = s2_block_mask(n_heads, ids, ids, local_blocks=1, vert_stride=stride)
    union = mask.any(0)
    assert torch.equal(union, torch.ones(n, n, dtype=torch.bool).tril())
    # One head alone sees far less than the causal triangle.
    assert mask[0].sum() < 0.5 * union.sum()


@pytest.mark.parametrize("t", [1, 7, 64, 100])
@pytest.mark.parametrize("decay", ["weak", "strong"])
@pytest.mark.parametrize("with_state", [False, True])
def test_gla_chunked_matches_step_recurrence(t, decay, with_state):
    b, h, dk, dv = 2, 3, 8, 6
    q, k, v = rand(b, t, h, dk), rand(b, t, h, dk), rand(b, t, h, dv)
    low = -20.0 if decay == "strong" else -0.1
    g = torch.rand(b, t, h, dtype=torch.float64) * low
    s0 = rand(b, h, dk, dv) if with_state else None
    o_ref, s_ref = gla_recurrent_ref(q, k, v, g, initial_state=s0, output_final_state=True)
    for chunk in (16, 64):
        o, s = gla_chunk_ref(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=chunk)
        assert rel_err(o, o_ref) < 1e-12 and rel_err(s, s_ref) < 1e-12


def test_gla_recurrence_is_the_formula():
    """S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t, written out for 3 tokens."""
    q, k, v = rand(1, 3, 1, 2), rand(1, 3, 1, 2), rand(1, 3, 1, 2)
    g = -torch.rand(1, 3, 1, dtype=torch.float64)
    s = torch.zeros(2, 2, dtype=torch.float64)
    for t in range(3):
        s = math.exp(g[0, t, 0]) * s + torch.outer(k[0, t, 0], v[0, t, 0])
        expected = 2**-0.5 * q[0, t, 0] @ s
        o, _ = gla_recurrent_ref(q, k, v, g)
        assert torch.allclose(o[0, t, 0], expected)


def test_gla_state_passing_splits_a_sequence_and_steps_decode():
    q, k, v, g = rand(1, 50, 2, 4), rand(1, 50, 2, 4), rand(1, 50, 2, 4), -torch.rand(1, 50, 2).double()
    whole, s_whole = gla_chunk_ref(q, k, v, g, output_final_state=True)
    a, s_mid = gla_chunk_ref(q[:, :21], k[:, :21], v[:, :21], g[:, :21], output_final_state=True)
    b, s_end = gla_chunk_ref(
        q[:, 21:], k[:, 21:], v[:, 21:], g[:, 21:], initial_state=s_mid, output_final_state=True
    )
    assert rel_err(torch.cat([a, b], 1), whole) < 1e-12 and rel_err(s_end, s_whole) < 1e-12
    o_t, s_next = gla_step_ref(q[:, 21], k[:, 21], v[:, 21], g[:, 21], s_mid)
    assert rel_err(o_t, whole[:, 21]) < 1e-12


def test_nsa_compress_matches_loop():
    b, t, h, d, l, s = 2, 45, 2, 4, 8, 4
    x, pe = rand(b, t, h, d), rand(l, d)
    w1, w2 = rand(16, l * d), rand(d, 16)
    out = compress_ref(x, pe, w1, w2, l, s)
    n = num_cmp_blocks(t, l, s)
    assert out.shape == (b, n, h, d) and n == (45 - 8) // 4 + 1
    for i in range(n):
        block = x[:, i * s : i * s + l] + pe[None, :, None, :]  # [B, L, H, D]
        flat = block.permute(0, 2, 1, 3).reshape(b, h, l * d)
        expected = block.mean(1) + torch.nn.functional.silu(flat @ w1.T) @ w2.T
        assert torch.allclose(out[:, i], expected)


def test_nsa_cmp_attn_sees_only_finished_blocks():
    t, l, s = 40, 8, 4
    q = rand(1, t, 4, 8)
    n = num_cmp_blocks(t, l, s)
    kc, vc = rand(1, n, 2, 8), rand(1, n, 2, 8)
    o, lse = cmp_attn_ref(q, kc, vc, l, s, return_lse=True)
    o_bf, lse_bf = brute_attention(q, kc, vc, lambda b, h, i, j: j * s + l - 1 <= i)
    assert rel_err(o, o_bf) < 1e-12 and rel_err(lse, lse_bf) < 1e-12
    assert torch.all(o[:, : l - 1] == 0)


def brute_select(q, kc, lse, l, s, S, top, scale=None):
    """Importance per (query, kv group, selection block) by loops, then the documented choice."""
    b_, t, h_, d = q.shape
    h_kv = kc.shape[2]
    g = h_ // h_kv
    scale = d**-0.5 if scale is None else scale
    n_slc = math.ceil(t / S)
    out = torch.full((b_, t, h_kv, top), -1, dtype=torch.int32)
    for b in range(b_):
        for t_ in range(t):
            qb = t_ // S
            for hk in range(h_kv):
                imp = [0.0] * n_slc
                for h in range(hk * g, (hk + 1) * g):
                    for i in range(kc.shape[1]):
                        if i * s + l - 1 > t_:
                            continue
                        p = math.exp(float((q[b, t_, h] * kc[b, i, hk]).sum()) * scale - float(lse[b, h, t_]))
                        for j in range(n_slc):
                            if i * s < (j + 1) * S and i * s + l > j * S:
                                imp[j] += p
                forced = {0, qb, qb - 1} - {-1}
                rest = sorted((j for j in range(qb + 1) if j not in forced), key=lambda j: (-imp[j], j))
                chosen = sorted(forced | set(rest[: max(0, top - len(forced))]))
                out[b, t_, hk, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


def test_nsa_select_blocks_matches_brute_force():
    t, l, s, S, top = 70, 8, 4, 8, 4
    q = rand(2, t, 4, 8)
    n = num_cmp_blocks(t, l, s)
    kc, vc = rand(2, n, 2, 8), rand(2, n, 2, 8)
    _, lse = cmp_attn_ref(q, kc, vc, l, s, return_lse=True)
    idx = select_blocks_ref(q, kc, lse, l, s, S, top)
    assert idx.dtype == torch.int32 and idx.shape == (2, t, 2, top)
    assert torch.equal(idx, brute_select(q, kc, lse, l, s, S, top))


def test_nsa_select_attn_matches_brute_force_with_unused_and_future_blocks():
    t, bs = 33, 4
    q, k, v = rand(2, t, 4, 8), rand(2, t, 2, 8), rand(2, t, 2, 8)
    n_blocks = math.ceil(t / bs)
    idx = torch.randint(-1, n_blocks, (2, t, 2, 3), dtype=torch.int32)  # -1 and future blocks included
    idx[0, 5, 0] = torch.tensor([n_blocks - 1, -1, 0])

    def allowed(b, h, i, j):
        return j <= i and (j // bs) in idx[b, i, h // 2].tolist()

    o, lse = select_attn_ref(q, k, v, idx, bs, return_lse=True)
    o_bf, lse_bf = brute_attention(q, k, v, allowed)
    assert rel_err(o, o_bf) < 1e-12 and rel_err(lse, lse_bf) < 1e-12
    with pytest.raises(ValueError, match="lists block 99"):
        select_attn_ref(q, k, v, torch.full_like(idx, 99), bs)
