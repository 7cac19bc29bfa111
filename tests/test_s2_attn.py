"""The S2 Triton kernels (forward, lse, every gradient) against the fp64 masked reference.

The kernels run under the Triton interpreter (`TRITON_INTERPRET=1`, set for this module only) on
small fp32 shapes: lengths that are not multiples of the block, block sizes 16 and 32, one and two
local blocks, strides 2 to 8, 4 and 8 heads, GQA, dense heads, sub-block tiles, and context-parallel
block-id subsets (a zigzag query shard against sparse key subsets, merged back into full rows).
"""

import pytest
import torch

from longctx.kernels import backend
from longctx.kernels.flash_attn.naive import merge_partials_ref
from longctx.kernels.s2_attn import s2_attn
from longctx.kernels.s2_attn.blocks import S2BlockLists, s2_block_lists
from longctx.kernels.s2_attn.naive import s2_attn_ref, s2_block_mask
from tests.conftest import rel_err

# The fp32 reference itself is ~1e-7 from fp64 on these shapes and the kernels land at ~2e-7 (the
# interpreter's dots are fp32, the online softmax only reorders sums); 1e-4 is the acceptance bound
# and leaves room for GPU dot precision, while a wrong block or mask costs > 1e-2.
TOL = 1e-4


# Compiled on a GPU, interpreted on CPU; every kernel buffer starts as NaN (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("triton_kernels", "nan_buffers")


@pytest.fixture
def s2_triton(triton_kernels):
    # Imported here, with the interpreter on, because @triton.jit reads TRITON_INTERPRET at import.
    from longctx.kernels.s2_attn import triton as module

    return module


def make_inputs(b, t_q, t_k, n_heads, n_kv, d):
    q = torch.randn(b, t_q, n_heads, d, dtype=torch.float64)
    k = torch.randn(b, t_k, n_kv, d, dtype=torch.float64)
    v = torch.randn(b, t_k, n_kv, d, dtype=torch.float64)
    do = torch.randn(b, t_q, n_heads, d, dtype=torch.float64)
    dlse = torch.randn(b, n_heads, t_q, dtype=torch.float64)
    return q, k, v, do, dlse


def run_with_grads(fn, q, k, v, do, dlse, dtype):
    """`(o, lse, dq, dk, dv)` of `fn(q, k, v) -> (o, lse)` under the loss `<o, do> + <lse, dlse>`."""
    leaves = [x.detach().to(dtype).clone().requires_grad_() for x in (q, k, v)]
    o, lse = fn(*leaves)
    # Rows that see no key have lse = -inf and no gradient; keep them out of the loss.
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    ((o * do.to(dtype)).sum() + (finite * dlse.to(dtype)).sum()).backward()
    return [o.detach(), lse.detach()] + [x.grad for x in leaves]


def assert_close(got, want, names=("o", "lse", "dq", "dk", "dv")):
    for name, a, b in zip(names, got, want):
        assert torch.isfinite(a[~torch.isinf(b)]).all(), (
            f"{name} has NaN or inf where the reference is finite"
        )
        err = rel_err(a, b)
        assert err < TOL, f"{name}: relative error {err:.2e} >= {TOL}"


CASES = [
    # b, t, n_heads, n_kv, d, block_size, local_blocks, vert_stride, dense_heads
    (2, 100, 4, 2, 16, 16, 1, 2, 0),
    (1, 77, 4, 4, 32, 32, 2, 4, 0),
    (1, 150, 8, 2, 16, 16, 1, 8, 2),
    (1, 45, 8, 8, 16, 16, 2, 3, 1),
    (1, 130, 4, 1, 32, 32, 1, 5, 0),
    (1, 96, 4, 2, 16, 16, 2, 6, 0),
    (1, 70, 8, 4, 24, 16, 1, 7, 0),
    (1, 64, 4, 2, 16, 16, 2, 2, 4),
]


def case_id(c):
    b, t, h, kv, d, bs, local, stride, dense = c
    return f"B{b}-T{t}-H{h}-KV{kv}-D{d}-bs{bs}-local{local}-stride{stride}-dense{dense}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_s2_attn_matches_reference(case, s2_triton):
    b, t, n_heads, n_kv, d, bs, local, stride, dense = case
    q, k, v, do, dlse = make_inputs(b, t, t, n_heads, n_kv, d)
    args = (bs, local, stride, dense)
    want = run_with_grads(
        lambda *x: s2_attn_ref(*x, *args, return_lse=True), q, k, v, do, dlse, torch.float64
    )
    got = run_with_grads(lambda *x: s2_attn(*x, *args, return_lse=True), q, k, v, do, dlse, torch.float32)
    assert_close(got, want)


@pytest.mark.parametrize(
    "tiles", [(16, 16), (32, 16), (64, 32), (64, 16)], ids=lambda x: f"outer{x[0]}-inner{x[1]}"
)
def test_s2_attn_tile_shapes_match_reference(tiles, s2_triton):
    """Outer tiles of half a block, one block or two blocks; inner tiles of half or a whole block."""
    bs, local, stride, dense, scale = 32, 1, 3, 1, 0.3
    q, k, v, do, dlse = make_inputs(1, 90, 90, 4, 2, 16)
    want = run_with_grads(
        lambda *x: s2_attn_ref(*x, bs, local, stride, dense, scale=scale, return_lse=True),
        q, k, v, do, dlse, torch.float64,
    )  # fmt: skip
    got = run_with_grads(
        lambda *x: s2_triton.s2_attn_triton(*x, bs, local, stride, dense, scale, tiles=tiles),
        q, k, v, do, dlse, torch.float32,
    )  # fmt: skip
    assert_close(got, want)


@pytest.mark.parametrize("tiles", [None, (32, 16)], ids=["default-tiles", "two-block-tiles"])
def test_s2_attn_block_ids_give_rows_of_full_attention(tiles, s2_triton):
    """A zigzag query shard against two sparse, sorted key-block subsets that partition the sequence:
    each partial matches the reference at the same ids, and merging the partials by lse gives the
    shard's rows of the full S2 attention (outputs and gradients). Two-block tiles span the shard's
    gap (blocks 2 and 9 share a tile)."""

    def kernel(q, k, v, bs, local, stride, dense, q_block_ids, k_block_ids):
        """The Triton kernels with the tile shape under test; returns `(o, lse)`."""
        scale = q.shape[-1] ** -0.5
        ids = (q_block_ids, k_block_ids)
        return s2_triton.s2_attn_triton(q, k, v, bs, local, stride, dense, scale, *ids, tiles=tiles)

    bs, local, stride, dense, n_heads, n_kv, d = 16, 2, 4, 1, 4, 2, 16
    t = 12 * bs - 5  # 12 blocks, the last partial

    def tokens(block_ids):
        return torch.cat([torch.arange(i * bs, min((i + 1) * bs, t)) for i in block_ids.tolist()])

    q_ids = torch.tensor([0, 1, 2, 9, 10, 11])  # zigzag chunks 0 and 3 of 4
    key_sets = [torch.tensor([0, 3, 4, 7, 10, 11]), torch.tensor([1, 2, 5, 6, 8, 9])]
    q, k, v, do, dlse = make_inputs(1, t, t, n_heads, n_kv, d)
    rows = tokens(q_ids)
    do_shard, dlse_shard = do[:, rows], dlse[..., : len(rows)]

    partials = []
    for k_ids in key_sets:
        cols, ids = tokens(k_ids), {"q_block_ids": q_ids, "k_block_ids": k_ids}
        inputs = (q[:, rows], k[:, cols], v[:, cols], do_shard, dlse_shard)
        want = run_with_grads(
            lambda *x, ids=ids: s2_attn_ref(*x, bs, local, stride, dense, return_lse=True, **ids),
            *inputs, torch.float64,
        )  # fmt: skip
        got = run_with_grads(
            lambda *x, ids=ids: kernel(*x, bs, local, stride, dense, **ids), *inputs, torch.float32
        )
        assert_close(got, want)
        partials.append(got[:2])

    o, lse = merge_partials_ref([p[0] for p in partials], [p[1] for p in partials])
    whole_o, whole_lse = s2_attn_ref(q, k, v, bs, local, stride, dense, return_lse=True)
    assert_close([o, lse], [whole_o[:, rows], whole_lse[..., rows]], names=("merged o", "merged lse"))

    # Gradients through the merge equal the shard's part of the whole sequence's gradients.
    def merged(qs, ks, vs):
        parts = [
            kernel(
                qs[:, rows],
                ks[:, tokens(k_ids)],
                vs[:, tokens(k_ids)],
                bs,
                local,
                stride,
                dense,
                q_ids,
                k_ids,
            )
            for k_ids in key_sets
        ]
        return merge_partials_ref([p[0] for p in parts], [p[1] for p in parts])

    def whole(qs, ks, vs):
        o_all, lse_all = s2_attn_ref(qs, ks, vs, bs, local, stride, dense, return_lse=True)
        return o_all[:, rows], lse_all[..., rows]

    got = run_with_grads(merged, q, k, v, do_shard, dlse_shard, torch.float32)
    want = run_with_grads(whole, q, k, v, do_shard, dlse_shard, torch.float64)
    assert_close(got[2:], want[2:], names=("dq", "dk", "dv"))


def test_s2_attn_rows_with_no_key_give_zero_and_finite_gradients(s2_triton):
    """Late query blocks against two early key blocks that only some heads stride onto."""
    bs, local, stride = 16, 1, 4
    q_ids, k_ids = torch.tensor([10, 11]), torch.tensor([1, 3])
    q, k, v, do, dlse = make_inputs(1, 2 * bs, 2 * bs, 4, 2, 16)
    ids = {"q_block_ids": q_ids, "k_block_ids": k_ids}
    got = run_with_grads(
        lambda *x: s2_attn(*x, bs, local, stride, return_lse=True, **ids), q, k, v, do, dlse, torch.float32
    )
    want = run_with_grads(
        lambda *x: s2_attn_ref(*x, bs, local, stride, return_lse=True, **ids),
        q,
        k,
        v,
        do,
        dlse,
        torch.float64,
    )
    # head_step 1: key block 1 is strided for head 2 and block 3 for head 0; heads 1 and 3 see nothing.
    o, lse = got[:2]
    assert torch.isinf(lse[:, [1, 3]]).all() and torch.isfinite(lse[:, [0, 2]]).all()
    assert (o[:, :, [1, 3]] == 0).all()
    assert all(torch.isfinite(g).all() for g in got[2:])
    assert_close(got, want)


def test_s2_attn_runs_the_triton_kernels(s2_triton, monkeypatch):
    """Through the public function the launchers are called; with the naive backend they are not."""
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = s2_triton.s2_attn_fwd, s2_triton.s2_attn_bwd

    def count(name, fn):
        def wrapped(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)

        return wrapped

    monkeypatch.setattr(s2_triton, "s2_attn_fwd", count("fwd", fwd))
    monkeypatch.setattr(s2_triton, "s2_attn_bwd", count("bwd", bwd))
    q, k, v = (torch.randn(1, 40, 4, 16, requires_grad=True) for _ in range(3))
    s2_attn(q, k, v, 16, 1, 2).sum().backward()
    assert calls == {"fwd": 1, "bwd": 1}
    with backend("naive"):
        s2_attn(q, k, v, 16, 1, 2).sum().backward()
    assert calls == {"fwd": 1, "bwd": 1}


def test_s2_attn_comparison_fails_on_a_wrong_pattern(s2_triton):
    """The check above can fail: a kernel run with another stride, or a perturbed key, is far off."""
    q, k, v, _, _ = make_inputs(1, 100, 100, 4, 2, 16)
    want = s2_attn_ref(q, k, v, 16, 1, 2)
    wrong_stride = s2_attn(q.float(), k.float(), v.float(), 16, 1, 4)
    perturbed = k.clone()
    perturbed[:, 37] += 1.0
    wrong_key = s2_attn(q.float(), perturbed.float(), v.float(), 16, 1, 2)
    assert rel_err(wrong_stride, want) > 100 * TOL and rel_err(wrong_key, want) > 10 * TOL


def test_s2_attn_rejects_bad_block_ids():
    q = torch.randn(1, 40, 2, 16)
    with pytest.raises(ValueError, match="strictly increasing"):
        s2_attn(q, q, q, 16, 1, 2, q_block_ids=torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="need 3 ids, got 2"):
        s2_attn(q, q, q, 16, 1, 2, k_block_ids=torch.tensor([0, 1]))


def csr_rows(lists):
    """Per list row: (entries without a mask, entries with one) as Python sets, checking the order."""
    rows = []
    for r in range(lists.offsets.numel() - 1):
        lo, mid, hi = int(lists.offsets[r]), int(lists.split[r]), int(lists.offsets[r + 1])
        plain, masked = lists.indices[lo:mid].tolist(), lists.indices[mid:hi].tolist()
        assert plain == sorted(plain) and masked == sorted(masked), "segments must be ascending"
        rows.append((set(plain), set(masked)))
    return rows


def expected_rows(mask, row_ids, col_ids, col_partial, tile, below):
    """Brute force: for each (head, tile) the inner blocks any block of the tile may see, and which of
    them every block of the tile sees entirely (`below(col_id, row_id)` for every row block)."""
    n_heads, n_rows, n_cols = mask.shape
    out = []
    for h in range(n_heads):
        for t0 in range(0, n_rows, tile):
            blocks = range(t0, min(t0 + tile, n_rows))
            union = {c for r in blocks for c in range(n_cols) if mask[h, r, c]}
            clean = {
                c
                for c in union
                if all(mask[h, r, c] and below(col_ids[c], row_ids[r]) for r in blocks)
                and not (col_partial and c == n_cols - 1)
            }
            out.append((clean, union - clean))
    return out


@pytest.mark.parametrize("tile", [1, 2])
@pytest.mark.parametrize(
    "n_heads,local,stride,dense,q_ids,k_ids,partial",
    [
        (4, 1, 2, 0, None, None, False),
        (8, 2, 8, 2, None, None, True),
        (4, 2, 4, 1, [0, 1, 2, 9, 10, 11], [0, 3, 4, 7, 10, 11], True),
        (8, 1, 3, 0, [5, 6, 20], [1, 2, 5, 8, 11, 14, 17, 20], False),
    ],
    ids=["H4-s2", "H8-s8-dense2-partial", "zigzag-partial", "sparse-keys"],
)
def test_s2_block_lists_match_block_mask(n_heads, local, stride, dense, q_ids, k_ids, partial, tile):
    q_ids = torch.arange(21) if q_ids is None else torch.tensor(q_ids)
    k_ids = torch.arange(21) if k_ids is None else torch.tensor(k_ids)
    lists = S2BlockLists(n_heads, q_ids, k_ids, local, stride, dense, "cpu", partial, partial)
    mask = s2_block_mask(n_heads, q_ids, k_ids, local, stride, dense)  # [H, NQ, NK]
    assert lists.num_pairs == int(mask.sum())
    fwd, bwd = lists.forward(tile), lists.backward(tile)
    want_fwd = expected_rows(mask, q_ids.tolist(), k_ids.tolist(), partial, tile, lambda kb, qb: kb < qb)
    want_bwd = expected_rows(
        mask.transpose(1, 2), k_ids.tolist(), q_ids.tolist(), partial, tile, lambda qb, kb: kb < qb
    )
    assert csr_rows(fwd) == want_fwd
    assert csr_rows(bwd) == want_bwd
    for tile_lists, n in ((fwd, len(q_ids)), (bwd, len(k_ids))):
        assert sorted(tile_lists.order.tolist()) == list(range(-(-n // tile)))
        # The tile with the most work launches first.
        work = (tile_lists.offsets[1:] - tile_lists.offsets[:-1]).view(n_heads, -1).sum(0)
        assert work[tile_lists.order[0]] == work.max()


@pytest.mark.parametrize("n_heads,stride", [(4, 4), (8, 4), (8, 8)])
def test_s2_block_lists_union_of_heads_covers_causal_blocks(n_heads, stride):
    ids = torch.arange(30)
    rows = csr_rows(S2BlockLists(n_heads, ids, ids, 1, stride, 0, "cpu", False, False).forward(1))
    per_head = torch.zeros(n_heads, 30, 30, dtype=torch.bool)
    for r, (plain, masked) in enumerate(rows):
        per_head[r // 30, r % 30, list(plain | masked)] = True
    assert torch.equal(per_head.any(0), torch.ones(30, 30, dtype=torch.bool).tril())
    # Each head alone visits far fewer blocks than the causal triangle.
    assert (per_head.sum((1, 2)) < 0.5 * 30 * 31 / 2).all()


def test_s2_block_lists_are_cached_per_pattern_and_ids():
    ids = torch.arange(8)
    a = s2_block_lists(4, ids, ids, 1, 2, 0, "cpu", 16, 128, 128)
    assert s2_block_lists(4, ids.clone(), ids.clone(), 1, 2, 0, "cpu", 16, 128, 128) is a
    assert a.forward(2) is a.forward(2)
    assert (
        s2_block_lists(4, ids, torch.tensor([0, 1, 2, 3, 4, 5, 6, 9]), 1, 2, 0, "cpu", 16, 128, 128) is not a
    )
    assert s2_block_lists(4, ids, ids, 1, 4, 0, "cpu", 16, 128, 128) is not a
    assert s2_block_lists(4, ids, ids, 1, 2, 0, "cpu", 16, 120, 120) is not a


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_s2_attn_bf16_on_gpu_matches_reference():
    """Compiled and autotuned on the GPU, bf16: within bf16 rounding of the fp32 reference."""
    q, k, v, do, dlse = (x.cuda() for x in make_inputs(2, 1000, 1000, 8, 2, 128))
    args = (64, 4, 4, 1)
    want = run_with_grads(
        lambda *x: s2_attn_ref(*x, *args, return_lse=True), q, k, v, do, dlse, torch.float32
    )
    got = run_with_grads(lambda *x: s2_attn(*x, *args, return_lse=True), q, k, v, do, dlse, torch.bfloat16)
    # bf16 keeps 8 bits of mantissa: inputs alone are off by ~4e-3 relative.
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, want):
        assert rel_err(a, b) < 2e-2, name


@pytest.mark.parametrize("where", ["triton", "naive"])
def test_s2_chunk_entry_points_merge_to_full_attention_and_its_gradients(where, s2_triton):
    """`s2_attn_chunk_fwd` over two key-block sets of a zigzag query shard, merged by lse, gives the
    shard's rows of the full attention; `s2_attn_chunk_bwd` of each set, given the MERGED o and lse,
    sums to the full gradients (what context parallelism's peer-by-peer backward relies on)."""
    from longctx.kernels.s2_attn import s2_attn_chunk_bwd, s2_attn_chunk_fwd

    bs, local, stride, dense, n_heads, n_kv, d = 16, 2, 4, 1, 4, 2, 16
    t = 12 * bs
    q_ids = torch.tensor([0, 1, 2, 9, 10, 11])
    key_sets = [torch.tensor([0, 3, 4, 7, 10, 11]), torch.tensor([1, 2, 5, 6, 8, 9])]

    def tokens(block_ids):
        return torch.cat([torch.arange(i * bs, (i + 1) * bs) for i in block_ids.tolist()])

    q, k, v, do, _ = make_inputs(1, t, t, n_heads, n_kv, d)
    rows = tokens(q_ids)
    dtype = torch.float32 if where == "triton" else torch.float64
    qs, ks, vs, dos = (x.to(dtype) for x in (q[:, rows], k, v, do[:, rows]))
    pattern = (bs, local, stride, dense, q_ids)
    with backend(where):
        parts = [s2_attn_chunk_fwd(qs, ks[:, tokens(i)], vs[:, tokens(i)], *pattern, i) for i in key_sets]
        o, lse = merge_partials_ref([p[0] for p in parts], [p[1] for p in parts])
        dq, dk, dv = torch.zeros_like(qs), torch.zeros_like(ks), torch.zeros_like(vs)
        for ids in key_sets:
            cols = tokens(ids)
            g = s2_attn_chunk_bwd(dos, qs, ks[:, cols], vs[:, cols], o, lse, *pattern, ids)
            dq += g[0]
            dk[:, cols] += g[1]
            dv[:, cols] += g[2]

    def whole(q_, k_, v_):
        o_all, lse_all = s2_attn_ref(q_, k_, v_, bs, local, stride, dense, return_lse=True)
        return o_all[:, rows], lse_all[..., rows]

    want = run_with_grads(whole, q, k, v, do[:, rows], torch.zeros(1, n_heads, len(rows)), torch.float64)
    want[2] = want[2][:, rows]
    assert_close([o, lse, dq, dk, dv], want)


def random_tables(n_kv, n_blocks, generator):
    """Two `[H_kv, n]` tables per kv head that split blocks `0..n_blocks-1` differently for each kv
    head (so a block sits in table A for one head and in table B for another), `-1` padded."""
    parts = ([], [])
    for _ in range(n_kv):
        side = torch.randint(0, 2, (n_blocks,), generator=generator)
        for s in (0, 1):
            parts[s].append(torch.nonzero(side == s).flatten().tolist())
    tables = []
    for rows in parts:
        width = max(len(r) for r in rows) + 1  # at least one -1 slot in every row
        tables.append(torch.tensor([r + [-1] * (width - len(r)) for r in rows]))
    return tables


def gather_table(x, table, bs):
    """`[B, T, H_kv, D]` whole-sequence keys -> `[B, H_kv, n, bs, D]` per the table (differentiable;
    unused slots hold a finite filler, never read)."""
    blocks = x.unflatten(1, (-1, bs)).permute(0, 3, 1, 2, 4)  # [B, H_kv, n_blocks, bs, D]
    filler = torch.full_like(blocks[:, :, :1], 7.0)
    padded = torch.cat([blocks, filler], dim=2)  # slot -1 reads the filler
    heads = torch.arange(x.shape[2])[:, None]
    return padded[:, heads, table]


@pytest.mark.parametrize("docs,tiles", [(False, (32, 16)), (True, None)], ids=["two-block-tiles", "docs"])
def test_s2_attn_block_tables_merge_to_full_attention(docs, tiles, s2_triton):
    """Per-kv-head block tables (2 kv heads, 2 query heads each, a dense head, -1 padding): each kv
    head splits the key blocks into two tables differently, so a block one head holds in table A the
    other holds in table B. The two kernel results merged by lse give the zigzag shard's rows of the
    whole-sequence S2 attention (the plain fp64 reference, documents or not) and every gradient;
    unused slots get zero gradient; dropping a needed block breaks the match."""
    bs, local, stride, dense, n_heads, n_kv, d = 16, 2, 3, 1, 4, 2, 16
    n_blocks = 6
    t = n_blocks * bs
    q_ids = torch.tensor([0, 5])  # zigzag chunks 0 and 5 of 6
    rows = torch.cat([torch.arange(i * bs, (i + 1) * bs) for i in q_ids.tolist()])
    cu = torch.tensor([[0, 40, 75, t]], dtype=torch.int32) if docs else None
    tables = random_tables(n_kv, n_blocks, torch.Generator().manual_seed(3))
    q, k, v, do, dlse = make_inputs(1, t, t, n_heads, n_kv, d)
    pattern = dict(block_size=bs, local_blocks=local, vert_stride=stride, dense_heads=dense)

    def kernel(qs, kb, vb, table):
        if tiles is None:
            return s2_attn(qs, kb, vb, **pattern, return_lse=True, q_block_ids=q_ids, k_block_ids=table,
                           cu_seqlens=cu)  # fmt: skip
        k4, v4 = (x.flatten(2, 3).transpose(1, 2) for x in (kb, vb))
        return s2_triton.s2_attn_triton(qs, k4, v4, bs, local, stride, dense, d**-0.5, q_ids, table, tiles)

    grads_of_buffers = []

    def merged(qs, ks, vs):
        parts = []
        for tb in tables:
            kb, vb = gather_table(ks, tb, bs), gather_table(vs, tb, bs)
            for x in (kb, vb):
                x.retain_grad()
            grads_of_buffers.append((kb, vb))
            parts.append(kernel(qs[:, rows], kb, vb, tb))
        return merge_partials_ref([p[0] for p in parts], [p[1] for p in parts])

    def whole(qs, ks, vs):
        o_all, lse_all = s2_attn_ref(qs, ks, vs, **pattern, return_lse=True, cu_seqlens=cu)
        return o_all[:, rows], lse_all[..., rows]

    do_shard, dlse_shard = do[:, rows], dlse[..., : len(rows)]
    got = run_with_grads(merged, q, k, v, do_shard, dlse_shard, torch.float32)
    want = run_with_grads(whole, q, k, v, do_shard, dlse_shard, torch.float64)
    assert_close(got, want)
    for tb, (kb, vb) in zip(tables, grads_of_buffers):
        assert (kb.grad[:, tb < 0] == 0).all() and (vb.grad[:, tb < 0] == 0).all()
    # The check can fail: drop the last block kv head 1 holds in table A and the merge is off.
    broken = tables[0].clone()
    broken[1, int((broken[1] >= 0).sum()) - 1] = -1
    with torch.no_grad():
        qs, ks, vs = (x.float() for x in (q, k, v))
        parts = [kernel(qs[:, rows], gather_table(ks, tb, bs), gather_table(vs, tb, bs), tb)
                 for tb in (broken, tables[1])]  # fmt: skip
        o_bad = merge_partials_ref([p[0] for p in parts], [p[1] for p in parts])[0]
    assert rel_err(o_bad, want[0]) > 10 * TOL


def test_s2_attn_block_table_chunk_entry_points(s2_triton):
    """`s2_attn_chunk_fwd` / `_bwd` with tables, Triton and reference, agree (what CP calls)."""
    from longctx.kernels.s2_attn import s2_attn_chunk_bwd, s2_attn_chunk_fwd

    bs, n_heads, n_kv, d = 16, 4, 2, 16
    q_ids = torch.tensor([2, 4])
    table = torch.tensor([[0, 2, -1], [1, 3, 4]])
    q, _, _, do, _ = make_inputs(1, 2 * bs, 1, n_heads, n_kv, d)
    kb, vb = (torch.randn(1, n_kv, 3, bs, d, dtype=torch.float64) for _ in range(2))
    args = (bs, 2, 2, 0, q_ids, table)
    out = {}
    for where, dtype in (("triton", torch.float32), ("naive", torch.float64)):
        x = [t.to(dtype) for t in (q, kb, vb, do)]
        with backend(where):
            o, lse = s2_attn_chunk_fwd(*x[:3], *args)
            out[where] = [o, lse, *s2_attn_chunk_bwd(x[3], *x[:3], o, lse, *args)]
    assert_close(out["triton"], out["naive"])
    assert out["triton"][3].shape == kb.shape and (out["triton"][3][:, 0, 2] == 0).all()


def test_s2_attn_rejects_bad_block_tables():
    q = torch.randn(1, 32, 4, 16)
    kb = torch.randn(1, 2, 3, 16, 16)
    with pytest.raises(ValueError, match="needs its block table"):
        s2_attn(q, kb, kb, 16, 1, 2)
    with pytest.raises(ValueError, match="followed only by -1"):
        s2_attn(q, kb, kb, 16, 1, 2, k_block_ids=torch.tensor([[0, -1, 1], [0, 1, 2]]))
    with pytest.raises(ValueError, match="strictly increasing"):
        s2_attn(q, kb, kb, 16, 1, 2, k_block_ids=torch.tensor([[1, 0, -1], [0, 1, 2]]))
    with pytest.raises(ValueError, match=r"\[H_kv, 3\] table"):
        s2_attn(q, kb, kb, 16, 1, 2, k_block_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="block_size=32"):
        s2_attn(q, kb, kb, 32, 1, 2, k_block_ids=torch.tensor([[0, 1, 2], [0, 1, 2]]))
