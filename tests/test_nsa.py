"""NSA's Triton kernels (compiled on a GPU, interpreted on CPU) against the fp64 references of
`kernels/nsa/naive.py` (themselves checked against brute force in `test_reference_ops.py`), and the N
mixer's Triton path against its reference path.

    .venv/bin/python -m pytest tests/test_nsa.py -q

Tolerance: fp32 kernels against fp64 references must agree to 1e-4 relative (norm of the difference
over norm of the reference). The fp32 reference itself lands near 1e-7 on these shapes, so 1e-4 leaves
room for a different summation order but not for a wrong mask, a missed block or a lost row, which
cost percents (`test_nsa_select_attn_check_can_fail` shows one).
"""

import math
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from longctx.config import ModelConfig, NSAConfig
from longctx.kernels import backend
from longctx.kernels.nsa import nsa_cmp_attn, nsa_select_attn, nsa_select_blocks, num_cmp_blocks
from longctx.kernels.nsa.naive import cmp_attn_ref, select_attn_ref, select_blocks_ref
from longctx.model.mixers.nsa import NativeSparseAttention
from longctx.model.rope import rope_cos_sin, rope_inv_freq
from longctx.parallel.layout import SeqLayout
from tests.conftest import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Compiled on a GPU, interpreted on CPU (tests/conftest.py); `nan_buffers` where a test asks for it.
pytestmark = pytest.mark.usefixtures("triton_kernels")

TOL = 1e-4


@pytest.fixture
def launches(monkeypatch):
    """Counts every launcher call, proving the Triton kernels (not the references) ran."""
    from longctx.kernels.nsa.triton import cmp_attn, select_attn, select_blocks

    counts = Counter()

    def counted(module, name):
        fn = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    for module, name in [
        (select_attn, "select_attn_fwd"),
        (select_attn, "select_attn_bwd"),
        (cmp_attn, "cmp_attn_fwd"),
        (cmp_attn, "cmp_attn_bwd"),
        (select_blocks, "select_blocks"),
    ]:
        counted(module, name)
    return counts


def leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE).requires_grad_()


def outputs_and_grads(fn, inputs, seed=1):
    """`fn(*inputs)` -> (o, lse), and the gradients of `sum(o * do) + sum(lse * dl)` (finite lse
    only) with fixed random `do`, `dl`, so both output gradients reach the backward."""
    o, lse = fn(*inputs)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device=o.device, dtype=o.dtype)
    dl = torch.randn(lse.shape, generator=gen, dtype=torch.float64).to(device=o.device, dtype=lse.dtype)
    loss = (o * do).sum() + (torch.where(torch.isinf(lse), 0.0, lse) * dl).sum()
    grads = torch.autograd.grad(loss, inputs)
    return o.detach(), lse.detach(), grads


def as_fp64(*xs):
    return [x.detach().double().requires_grad_() for x in xs]


# B, T, H, H_kv, D, block, listed blocks per query, q_offset, k_offset, T_k
SELECT_CASES = {
    "B2-T77-H4-Hkv2-D16-bs16": (2, 77, 4, 2, 16, 16, 3, 0, 0, 77),
    "B1-T70-H6-Hkv2-D32-bs32-G3": (1, 70, 6, 2, 32, 32, 3, 0, 0, 70),
    "B1-T37-H16-Hkv1-D16-bs16-G16": (1, 37, 16, 1, 16, 16, 2, 0, 0, 37),
    "B1-T45-H4-Hkv2-D16-bs16-offsets": (1, 45, 4, 2, 16, 16, 3, 50, 21, 74),
}


def select_inputs(b, t, h, h_kv, d, bs, n, q_offset, k_offset, t_k):
    q, k, v = leaf(b, t, h, d), leaf(b, t_k, h_kv, d), leaf(b, t_k, h_kv, d)
    n_blocks = math.ceil((k_offset + t_k) / bs)
    # Random lists: unused slots (-1), blocks after the query, repeats, and the query's own block.
    idx = torch.randint(-1, n_blocks, (b, t, h_kv, n), dtype=torch.int32, device=DEVICE)
    own = (torch.arange(t, device=DEVICE) + q_offset) // bs
    idx[:, ::3, :, 0] = own[::3].view(1, -1, 1).to(torch.int32)
    idx[:, 1] = -1  # a query that lists nothing: o = 0, lse = -inf
    return q, k, v, idx


@pytest.mark.parametrize("rows", [16, 64], ids=["rows16", "rows64"])
@pytest.mark.parametrize("case", SELECT_CASES.values(), ids=SELECT_CASES.keys())
def test_nsa_select_attn_matches_fp64_reference(case, rows, launches, nan_buffers, monkeypatch):
    from longctx.kernels.nsa.triton import select_attn

    # rows = query tokens x heads per forward / dq program: 16 is the default, 64 makes several
    # tokens share a program and walk the union of their block lists.
    monkeypatch.setattr(select_attn, "SELECT_ROWS", rows)
    b, t, h, h_kv, d, bs, n, q_off, k_off, t_k = case
    q, k, v, idx = select_inputs(*case)

    def kernel(q, k, v):
        return nsa_select_attn(q, k, v, idx, bs, return_lse=True, q_offset=q_off, k_offset=k_off)

    def ref(q, k, v):
        return select_attn_ref(q, k, v, idx, bs, return_lse=True, q_offset=q_off, k_offset=k_off)

    o, lse, grads = outputs_and_grads(kernel, (q, k, v))
    o_ref, lse_ref, grads_ref = outputs_and_grads(ref, as_fp64(q, k, v))
    assert launches["select_attn_fwd"] == 1 and launches["select_attn_bwd"] == 1
    assert rel_err(o, o_ref) < TOL and rel_err(lse, lse_ref) < TOL
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert rel_err(g, g_ref) < TOL, f"d{name}"


def test_nsa_select_attn_check_can_fail():
    """Dropping one listed block, or letting a query see one key past itself, moves the result far
    beyond the tolerance: the comparison above detects a wrong mask."""
    case = SELECT_CASES["B2-T77-H4-Hkv2-D16-bs16"]
    q, k, v, idx = select_inputs(*case)
    bs = case[5]
    with torch.no_grad():
        o = nsa_select_attn(q, k, v, idx, bs)
        dropped = idx.clone()
        dropped[..., 0] = -1
        q64, k64, v64 = q.double(), k.double(), v.double()
        assert rel_err(o, select_attn_ref(q64, k64, v64, dropped, bs)) > 100 * TOL
        assert rel_err(o, select_attn_ref(q64, k64, v64, idx, bs, q_offset=1)) > 100 * TOL


def test_nsa_select_attn_dkdv_is_deterministic(launches, nan_buffers, monkeypatch):
    """dK/dV without atomics: with work items of 8 query tokens each block's list is cut into several
    chunks; the first writes the block's rows and the others fp32 partial sums that a second kernel
    adds in chunk order. The gradients match the fp64 reference (a lost or doubled partial costs
    percents) and two runs agree to the last bit. On a GPU that is the check the atomics it replaced
    failed; the interpreter runs programs one by one, so on CPU it shows the path is reproducible."""
    from longctx.kernels.nsa.triton import select_attn

    monkeypatch.setattr(select_attn, "dkdv_chunk", lambda bt, n_sel, block_size: 8)
    # A context-parallel shard: queries at 24..63, keys at 8..63 (global positions).
    case = (1, 40, 2, 1, 16, 16, 2, 24, 8, 56)
    b, t, h, h_kv, d, bs, n, q_off, k_off, t_k = case
    q, k, v, idx = select_inputs(*case)
    norm = select_attn.normalize_block_idx(idx, bs, t_k, q_off, k_off)
    extra = select_attn.transpose_block_idx(norm, math.ceil((k_off + t_k) / bs), t_k, 8)[3]
    assert extra[-1] > b * h_kv, "the case must split blocks into several chunks"

    def kernel(q, k, v):
        return nsa_select_attn(q, k, v, idx, bs, return_lse=True, q_offset=q_off, k_offset=k_off)

    def ref(q, k, v):
        return select_attn_ref(q, k, v, idx, bs, return_lse=True, q_offset=q_off, k_offset=k_off)

    _, _, grads = outputs_and_grads(kernel, (q, k, v))
    _, _, again = outputs_and_grads(kernel, (q, k, v))
    _, _, grads_ref = outputs_and_grads(ref, as_fp64(q, k, v))
    assert launches["select_attn_bwd"] == 2
    for name, g, g2, g_ref in zip("qkv", grads, again, grads_ref):
        assert rel_err(g, g_ref) < TOL, f"d{name}"
        assert torch.equal(g, g2), f"d{name} differs between two runs"


def test_nsa_kernels_in_half_precision(launches):
    """fp16 inputs (the interpreter has no bf16): the kernels' error against fp64 stays within a small
    multiple of the error the fp32-computing reference makes on the same fp16 inputs."""
    case = SELECT_CASES["B2-T77-H4-Hkv2-D16-bs16"]
    bs = case[5]
    q, k, v, idx = select_inputs(*case)
    n_cmp = num_cmp_blocks(case[1], 16, 8)
    k_cmp, v_cmp = leaf(2, n_cmp, 2, 16), leaf(2, n_cmp, 2, 16)
    ops = {
        "select": (
            lambda q, k, v: nsa_select_attn(q, k, v, idx, bs, return_lse=True),
            lambda q, k, v: select_attn_ref(q, k, v, idx, bs, return_lse=True),
            (q, k, v),
        ),
        "cmp": (
            lambda q, kc, vc: nsa_cmp_attn(q, kc, vc, 16, 8, return_lse=True),
            lambda q, kc, vc: cmp_attn_ref(q, kc, vc, 16, 8, return_lse=True),
            (q, k_cmp, v_cmp),
        ),
    }

    def flat(result):
        o, lse, grads = result
        return [o, lse, *grads]

    for name, (kernel, ref, inputs) in ops.items():
        half = [x.detach().half().requires_grad_() for x in inputs]
        got = flat(outputs_and_grads(kernel, half))
        low = flat(outputs_and_grads(ref, half))
        best = flat(outputs_and_grads(ref, as_fp64(*half)))
        for i, (a, lo, b) in enumerate(zip(got, low, best)):
            assert rel_err(a, b) <= 3 * rel_err(lo, b) + 1e-6, f"{name}: output {i} (o, lse, grads)"
    assert launches["select_attn_bwd"] == 1 and launches["cmp_attn_bwd"] == 1


# B, T, H, H_kv, D, cmp_block, cmp_stride, q_offset
CMP_CASES = {
    "B2-T77-H4-Hkv2-D16-L16-S8": (2, 77, 4, 2, 16, 16, 8, 0),
    "B1-T90-H6-Hkv2-D32-L32-S16-G3": (1, 90, 6, 2, 32, 32, 16, 0),
    "B1-T50-H4-Hkv1-D16-L16-S8-offset": (1, 50, 4, 1, 16, 16, 8, 37),
    "B1-T10-H4-Hkv2-D16-L16-S8-empty": (1, 10, 4, 2, 16, 16, 8, 0),
}


@pytest.mark.parametrize("case", CMP_CASES.values(), ids=CMP_CASES.keys())
def test_nsa_cmp_attn_matches_fp64_reference(case, launches, nan_buffers):
    b, t, h, h_kv, d, cmp_block, cmp_stride, q_off = case
    # Compressed tokens of the whole sequence up to the last query (global positions).
    n_cmp = num_cmp_blocks(q_off + t, cmp_block, cmp_stride)
    q, k_cmp, v_cmp = leaf(b, t, h, d), leaf(b, n_cmp, h_kv, d), leaf(b, n_cmp, h_kv, d)

    def kernel(q, k_cmp, v_cmp):
        return nsa_cmp_attn(q, k_cmp, v_cmp, cmp_block, cmp_stride, return_lse=True, q_offset=q_off)

    def ref(q, k_cmp, v_cmp):
        return cmp_attn_ref(q, k_cmp, v_cmp, cmp_block, cmp_stride, return_lse=True, q_offset=q_off)

    o, lse, grads = outputs_and_grads(kernel, (q, k_cmp, v_cmp))
    o_ref, lse_ref, grads_ref = outputs_and_grads(ref, as_fp64(q, k_cmp, v_cmp))
    assert launches["cmp_attn_fwd"] == 1 and launches["cmp_attn_bwd"] == 1
    if n_cmp == 0:
        assert torch.all(o == 0) and torch.all(lse == float("-inf"))
        assert all(torch.all(g == 0) for g in grads)
        return
    assert rel_err(o, o_ref) < TOL and rel_err(lse, lse_ref) < TOL
    for name, g, g_ref in zip(["q", "k_cmp", "v_cmp"], grads, grads_ref):
        assert rel_err(g, g_ref) < TOL, f"d{name}"


# B, T, H, H_kv, D, cmp_block, cmp_stride, slc_block, slc_top, q_offset
BLOCK_CASES = {
    "T200-L16-S8-slc16-top4": (1, 200, 4, 2, 16, 16, 8, 16, 4, 0),
    "T150-L8-S8-slc32-top3-G3": (1, 150, 6, 2, 16, 8, 8, 32, 3, 0),
    "T120-L16-S8-slc16-top5-offset": (1, 120, 4, 2, 16, 16, 8, 16, 5, 40),
    "T90-L32-S8-slc16-top4-fallback": (1, 90, 4, 2, 16, 32, 8, 16, 4, 0),
}


def block_inputs(b, t, h, h_kv, d, cmp_block, cmp_stride, q_off):
    q = torch.randn(b, t, h, d, device=DEVICE)
    k_cmp = torch.randn(b, num_cmp_blocks(q_off + t, cmp_block, cmp_stride), h_kv, d, device=DEVICE)
    _, lse = cmp_attn_ref(q, k_cmp, k_cmp, cmp_block, cmp_stride, return_lse=True, q_offset=q_off)
    return q, k_cmp, lse


@pytest.mark.parametrize("case", BLOCK_CASES.values(), ids=BLOCK_CASES.keys())
def test_nsa_select_blocks_matches_reference_exactly(case, launches, nan_buffers):
    from longctx.kernels.nsa.triton.select_blocks import supported

    b, t, h, h_kv, d, cmp_block, cmp_stride, slc_block, top, q_off = case
    q, k_cmp, lse = block_inputs(b, t, h, h_kv, d, cmp_block, cmp_stride, q_off)
    args = (cmp_block, cmp_stride, slc_block, top)
    idx = nsa_select_blocks(q, k_cmp, lse, *args, q_offset=q_off)
    expected = select_blocks_ref(q, k_cmp, lse, *args, q_offset=q_off)
    assert idx.dtype == torch.int32 and torch.equal(idx, expected)
    # Geometries the kernel does not handle (a compression block reaching back past the previous
    # selection block) go to the reference.
    assert launches["select_blocks"] == (1 if supported(cmp_block, cmp_stride, slc_block) else 0)


def test_nsa_select_blocks_breaks_ties_towards_lower_blocks(launches):
    """Zero compressed keys give every visible compressed token the same probability, so all
    interior selection blocks tie: the choice must be the lowest ones, as in the reference."""
    b, t, h, h_kv, d, cmp_block, cmp_stride, slc_block, top = 1, 100, 4, 2, 16, 16, 8, 16, 5
    q = torch.randn(b, t, h, d, device=DEVICE)
    k_cmp = torch.zeros(b, num_cmp_blocks(t, cmp_block, cmp_stride), h_kv, d, device=DEVICE)
    _, lse = cmp_attn_ref(q, k_cmp, k_cmp, cmp_block, cmp_stride, return_lse=True)
    idx = nsa_select_blocks(q, k_cmp, lse, cmp_block, cmp_stride, slc_block, top)
    assert launches["select_blocks"] == 1
    assert torch.equal(idx, select_blocks_ref(q, k_cmp, lse, cmp_block, cmp_stride, slc_block, top))
    # Query 90 (block 5): forced 0, 4, 5; blocks 1..3 each hold 3 visible compressed tokens and
    # tie, so the two free slots go to 1 and 2.
    assert idx[0, 90, 0].tolist() == [0, 1, 2, 4, 5]
    # Compressed token 6 (keys 48..63) lies in block 3 only: aligning it with query 90's two heads
    # makes block 3 the most important free block, and the choice follows.
    k_cmp[0, 6, 0] = 3.0 * (q[0, 90, 0] + q[0, 90, 1])
    _, lse = cmp_attn_ref(q, k_cmp, k_cmp, cmp_block, cmp_stride, return_lse=True)
    idx = nsa_select_blocks(q, k_cmp, lse, cmp_block, cmp_stride, slc_block, top)
    assert idx[0, 90, 0].tolist() == [0, 1, 3, 4, 5]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nsa_compiled_kernels_match_reference_on_gpu():
    """The compiled (not interpreted) kernels on the GPU, bf16 and fp32, whole NSA core with all
    gradients: `bench/nsa.py --check` in a fresh process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "longctx.bench.nsa", "--check"]
    assert subprocess.run(cmd, env=env).returncode == 0


def small_mixer(t_window=32):
    cfg = ModelConfig(
        vocab_size=64,
        dim=64,
        n_layers=1,
        n_heads=4,
        n_kv_heads=2,
        layers="N",
        nsa=NSAConfig(cmp_block=16, cmp_stride=8, slc_block=16, slc_top=4, window=t_window),
    )
    mixer = NativeSparseAttention(cfg)
    # nn.Linear's default init gives O(1) logits, so block importances are far from ties.
    for comp in (mixer.compress_k, mixer.compress_v):
        comp.init_weights(0.2)
    inv_freq, _ = rope_inv_freq(cfg.head_dim, cfg.rope)
    return mixer, inv_freq


@pytest.mark.parametrize("t", [100, 61], ids=["T100", "T61"])
def test_nsa_mixer_triton_path_matches_reference_path(t, launches):
    mixer, inv_freq = small_mixer()
    mixer.to(DEVICE)
    x = torch.randn(2, t, 64, device=DEVICE)
    cos, sin = rope_cos_sin(torch.arange(t, device=DEVICE), inv_freq)
    layout = SeqLayout.full(t)
    dy = torch.randn(2, t, 64, device=DEVICE)
    results = {}
    for name in ("naive", "triton"):
        mixer.zero_grad()
        xi = x.clone().requires_grad_()
        with backend(name):
            y = mixer(xi, cos, sin, layout)
            (y * dy).sum().backward()
        results[name] = (y.detach(), xi.grad, {n: p.grad.clone() for n, p in mixer.named_parameters()})
    assert launches["cmp_attn_fwd"] == 1 and launches["select_blocks"] == 1
    assert launches["select_attn_fwd"] == 1 and launches["select_attn_bwd"] == 1
    assert launches["cmp_attn_bwd"] == 1
    y_ref, dx_ref, grads_ref = results["naive"]
    y, dx, grads = results["triton"]
    assert rel_err(y, y_ref) < TOL and rel_err(dx, dx_ref) < TOL
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        assert rel_err(g, grads_ref[name]) < TOL, name


@pytest.mark.parametrize("where", ["triton", "naive"])
def test_nsa_select_chunk_entry_points_merge_to_full_attention_and_its_gradients(where):
    """`nsa_select_attn_chunk_fwd` over two key chunks (listed blocks outside a chunk skipped), merged by
    lse, gives the full selected attention; `nsa_select_attn_chunk_bwd` of each chunk, given the MERGED
    o and lse, sums to the full gradients (context parallelism's peer-by-peer N backward)."""
    from longctx.kernels.flash_attn.naive import merge_partials_ref
    from longctx.kernels.nsa import nsa_select_attn_chunk_bwd, nsa_select_attn_chunk_fwd

    bs, q_off, t, t_k = 16, 64, 32, 96
    q, k, v, idx = select_inputs(1, t, 4, 2, 16, bs, 3, q_off, 0, t_k)
    do = torch.randn_like(q)
    chunks = [(0, 32), (32, 96)]
    with backend(where):
        parts = [nsa_select_attn_chunk_fwd(q, k[:, a:b], v[:, a:b], idx, bs, q_off, a) for a, b in chunks]
        o, lse = merge_partials_ref([p[0] for p in parts], [p[1] for p in parts])
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for a, b in chunks:
            g = nsa_select_attn_chunk_bwd(do, q, k[:, a:b], v[:, a:b], o, lse, idx, bs, q_off, a)
            dq += g[0]
            dk[:, a:b] += g[1]
            dv[:, a:b] += g[2]
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o_ref, lse_ref = select_attn_ref(*leaves, idx, bs, return_lse=True, q_offset=q_off)
    (o_ref * do.double()).sum().backward()
    assert rel_err(o, o_ref.detach()) < TOL and rel_err(lse, lse_ref.detach()) < TOL
    for name, got, want in zip("qkv", (dq, dk, dv), leaves):
        assert rel_err(got, want.grad) < TOL, f"d{name}"
