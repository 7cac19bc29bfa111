"""Dense flash attention (`longctx.kernels.flash_attn`): the Triton kernels against an fp64 reference.

Without a GPU the kernels run in the Triton interpreter (`TRITON_INTERPRET=1`, set for this module
only), in fp32; with a GPU the same tests run them compiled on CUDA, plus the bf16 tests marked `gpu`.
The oracle is `attention_ref` in fp64 with autograd for gradients (it shares no code with the kernels and
is itself checked against brute force in test_reference_ops.py).

    .venv/bin/python -m pytest tests/test_flash_attn.py -q
"""

import collections
import importlib
import math

import pytest
import torch

from longctx.kernels import backend
from longctx.kernels.flash_attn import (
    attention_bwd_ref,
    attention_ref,
    flash_attn,
    flash_attn_chunk,
    flash_attn_chunk_bwd,
    flash_attn_chunk_fwd,
    merge_partials,
    merge_partials_ref,
)
from longctx.kernels.flash_attn.naive import position_mask
from tests.conftest import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Acceptance bound for fp32 kernels against fp64 (relative norm). The kernels' own error is ~1e-7 to
# 1e-6 (fp32 rounding of sums over a few hundred terms), so 1e-4 leaves room without hiding a bug: a
# wrong mask or offset gives errors of order 1 (test_tolerance_catches_a_shifted_mask).
TOL = 1e-4
KERNELS = ("_attn_fwd_kernel", "_attn_bwd_pre_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")


# Compiled on a GPU, interpreted on CPU; every kernel buffer starts as NaN (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("triton_kernels", "nan_buffers")


class _Counted:
    """Stands in for a Triton kernel object and counts its launches."""

    def __init__(self, kernel, name, counts):
        self.kernel, self.name, self.counts = kernel, name, counts

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.counts[self.name] += 1
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def launches(monkeypatch):
    """Counter of Triton kernel launches by kernel name."""
    module = importlib.import_module("longctx.kernels.flash_attn.triton")
    counts = collections.Counter()
    for name in KERNELS:
        monkeypatch.setattr(module, name, _Counted(getattr(module, name), name, counts))
    return counts


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def finite(x):
    """`x` with -inf (rows that see no key) replaced by 0, for use in a loss."""
    return torch.where(torch.isinf(x), torch.zeros_like(x), x)


def reference(q, k, v, do, dlse, causal, window, q_offset=0, k_offset=0):
    """fp64 `(o, lse, dq, dk, dv)` of `loss = <o, do> + <lse, dlse>` by autograd through attention_ref."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    o, lse = attention_ref(q, k, v, causal, None, window, True, q_offset, k_offset)
    loss = (o * do.double()).sum() + (finite(lse) * dlse.double()).sum()
    return (o.detach(), lse.detach(), *torch.autograd.grad(loss, (q, k, v)))


def assert_close(name, got, ref, tol=TOL):
    err = rel_err(got.detach(), ref)
    assert err < tol, f"{name}: relative error {err:.3g} >= {tol:g}"


def mode_args(mode, t):
    """(causal, window) for a mode id; windows are a fraction of T so they cross block edges."""
    window = max(2, t // 3 + 3)
    return {
        "causal": (True, None),
        "full": (False, None),
        "window": (True, window),
        "full-window": (False, window),
    }[mode]


# (B, T, H, H_kv, D, mode): every length meets every mode and every GQA ratio (1, 2, 4) once; head dims
# 8 and 24 are padded inside the kernel. T = 100 and 257 are not multiples of any block size.
CASES = [
    (2, 1, 2, 2, 16, "causal"),
    (1, 1, 2, 1, 8, "full"),
    (1, 1, 4, 1, 16, "window"),
    (1, 100, 4, 2, 32, "causal"),
    (1, 100, 4, 1, 64, "full"),
    (1, 100, 2, 2, 24, "window"),
    (1, 257, 4, 1, 16, "causal"),
    (1, 257, 2, 2, 16, "full-window"),
    (1, 257, 2, 1, 32, "window"),
]


@pytest.mark.parametrize(
    "b,t,h,h_kv,d,mode", CASES, ids=[f"B{c[0]}-T{c[1]}-H{c[2]}-KV{c[3]}-D{c[4]}-{c[5]}" for c in CASES]
)
def test_flash_attn_matches_fp64_reference(b, t, h, h_kv, d, mode, launches):
    causal, window = mode_args(mode, t)
    q, k, v = rand(b, t, h, d), rand(b, t, h_kv, d), rand(b, t, h_kv, d)
    do, dlse = rand(b, t, h, d), rand(b, h, t)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o, lse = flash_attn(q, k, v, causal=causal, window=window, return_lse=True)
    loss = (o * do).sum() + (finite(lse) * dlse).sum()
    grads = torch.autograd.grad(loss, (q, k, v))

    assert o.dtype == torch.float32 and lse.dtype == torch.float32 and lse.shape == (b, h, t)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    for name, got, ref in zip(
        ("o", "lse", "dq", "dk", "dv"), (o, lse, *grads), reference(q, k, v, do, dlse, causal, window)
    ):
        assert_close(name, got, ref)
    # Every kernel really ran: forward once, backward's three launches once each.
    assert all(launches[name] == 1 for name in KERNELS), launches


def test_naive_backend_matches_triton_and_launches_nothing(launches):
    q, k, v = rand(1, 70, 4, 16), rand(1, 70, 2, 16), rand(1, 70, 2, 16)
    do = rand(1, 70, 4, 16)
    outs = {}
    for name in ("naive", "triton"):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        with backend(name):
            o = flash_attn(qq, kk, vv, window=30)
            outs[name] = (o, *torch.autograd.grad((o * do).sum(), (qq, kk, vv)))
        if name == "naive":
            assert sum(launches.values()) == 0
    assert launches["_attn_fwd_kernel"] == 1 and launches["_attn_bwd_dq_kernel"] == 1
    for a, b in zip(outs["naive"], outs["triton"]):
        assert_close("naive vs triton", a, b)


def test_attention_bwd_ref_matches_autograd():
    """The explicit naive backward (what ring attention runs on CPU) against autograd, in fp64, for a
    chunk pair at offsets with a window, GQA, a gradient into lse and rows that see no key."""
    q, k, v = (rand(2, 23, h, 8, dtype=torch.float64) for h in (4, 2, 2))
    q_offset, k_offset = 10, 14
    do, dlse = rand(2, 23, 4, 8, dtype=torch.float64), rand(2, 4, 23, dtype=torch.float64)
    o, lse, *grads = reference(q, k, v, do, dlse, True, 9, q_offset, k_offset)
    got = attention_bwd_ref(do, q, k, v, o, lse, q_offset, k_offset, True, None, 9, dlse=dlse)
    for name, a, b in zip(("dq", "dk", "dv"), got, grads):
        assert rel_err(a, b) < 1e-12, name
    assert torch.isinf(lse).any()  # rows 0..3 see no key


def chunk_bounds(t, sizes):
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s)
    assert starts[-1] == t
    return list(zip(starts[:-1], starts[1:]))


# Query chunks and (different) key chunks, so pairs fall before, after, on and across the diagonal.
T_CHUNKED = 96
Q_CHUNKS = chunk_bounds(T_CHUNKED, [40, 56])
K_CHUNKS = chunk_bounds(T_CHUNKED, [23, 41, 32])


def pair_is_empty(qs, qe, ks, ke, causal, window):
    allowed = position_mask(qe - qs, ke - ks, qs, ks, causal, window, "cpu")
    return allowed is not None and not allowed.any()


@pytest.mark.parametrize(
    "causal,window", [(True, None), (True, 30), (False, None)], ids=["causal", "window", "full"]
)
def test_chunk_pairs_merge_to_whole(causal, window, launches):
    """Every (query chunk, key chunk) pair at global offsets, merged by lse, equals the whole; pairs with
    nothing visible launch nothing."""
    q, k, v = rand(1, T_CHUNKED, 4, 16), rand(1, T_CHUNKED, 2, 16), rand(1, T_CHUNKED, 2, 16)
    o_ref, lse_ref = attention_ref(q.double(), k.double(), v.double(), causal, None, window, True)
    n_pairs = 0
    for qs, qe in Q_CHUNKS:
        parts = [
            flash_attn_chunk_fwd(q[:, qs:qe], k[:, ks:ke], v[:, ks:ke], qs, ks, causal, None, window)
            for ks, ke in K_CHUNKS
        ]
        n_pairs += sum(not pair_is_empty(qs, qe, ks, ke, causal, window) for ks, ke in K_CHUNKS)
        o, lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
        assert_close("o", o, o_ref[:, qs:qe])
        assert_close("lse", lse, lse_ref[..., qs:qe])
    assert launches["_attn_fwd_kernel"] == n_pairs
    if causal:
        assert n_pairs < len(Q_CHUNKS) * len(K_CHUNKS)


@pytest.mark.parametrize("causal,window", [(True, None), (True, 30)], ids=["causal", "window"])
def test_chunk_bwd_with_global_o_and_lse_sums_to_whole(causal, window, launches):
    """Ring attention's backward: each pair's gradients from the whole row's o and lse add up to the
    whole gradient (dq over key chunks, dk and dv over query chunks)."""
    q, k, v = rand(1, T_CHUNKED, 4, 16), rand(1, T_CHUNKED, 2, 16), rand(1, T_CHUNKED, 2, 16)
    do, dlse = rand(1, T_CHUNKED, 4, 16), torch.zeros(1, 4, T_CHUNKED, device=DEVICE)
    o_ref, lse_ref, dq_ref, dk_ref, dv_ref = reference(q, k, v, do, dlse, causal, window)
    o, lse = o_ref.float(), lse_ref.float()
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for qs, qe in Q_CHUNKS:
        for ks, ke in K_CHUNKS:
            dq_c, dk_c, dv_c = flash_attn_chunk_bwd(
                do[:, qs:qe],
                q[:, qs:qe],
                k[:, ks:ke],
                v[:, ks:ke],
                o[:, qs:qe],
                lse[..., qs:qe],
                qs,
                ks,
                causal,
                None,
                window,
            )
            assert dk_c.shape == (1, ke - ks, 2, 16)
            dq[:, qs:qe] += dq_c
            dk[:, ks:ke] += dk_c
            dv[:, ks:ke] += dv_c
    for name, got, ref in (("dq", dq, dq_ref), ("dk", dk, dk_ref), ("dv", dv, dv_ref)):
        assert_close(name, got, ref)
    assert launches["_attn_bwd_dq_kernel"] > 0


def test_chunks_through_merge_are_differentiable(launches):
    """flash_attn_chunk (gradient into o and lse) + merge_partials under autograd: the gradients of a
    loss on the merged o and lse equal the whole sequence's."""
    t = 80
    q, k, v = rand(1, t, 2, 16), rand(1, t, 1, 16), rand(1, t, 1, 16)
    do, dlse = rand(1, t, 2, 16), rand(1, 2, t)
    *_, dq_ref, dk_ref, dv_ref = reference(q, k, v, do, dlse, True, 50)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    split = 33
    outs, lses = [], []
    for ks, ke in ((0, split), (split, t)):
        o_c, lse_c = flash_attn_chunk(q, k[:, ks:ke], v[:, ks:ke], 0, ks, window=50)
        outs.append(o_c)
        lses.append(lse_c)
    o, lse = merge_partials(outs, lses)
    loss = (o * do).sum() + (finite(lse) * dlse).sum()
    for name, got, ref in zip(
        ("dq", "dk", "dv"), torch.autograd.grad(loss, (q, k, v)), (dq_ref, dk_ref, dv_ref)
    ):
        assert_close(name, got, ref)
    assert launches["_attn_bwd_dkdv_kernel"] == 2


def test_merge_partials_matches_reference_and_has_exact_gradients():
    """fp64, no kernels: forward equals merge_partials_ref; gradients equal autograd of the plain formula;
    chunks with lse = -inf drop out with zero gradient, and all-empty rows give o = 0, lse = -inf."""
    outs = [rand(2, 9, 3, 4, dtype=torch.float64) for _ in range(3)]
    lses = [rand(2, 3, 9, dtype=torch.float64) for _ in range(3)]
    lses[1][0, 0, :4] = -math.inf  # chunk 1 empty for some rows
    for c in range(3):
        lses[c][1, 2, 5] = -math.inf  # one row empty in every chunk
        outs[c][1, 5, 2] = 0.0
    outs = [x.requires_grad_() for x in outs]
    lses = [x.requires_grad_() for x in lses]
    do, dlse = rand(2, 9, 3, 4, dtype=torch.float64), rand(2, 3, 9, dtype=torch.float64)

    o, lse = merge_partials(outs, lses)
    o_ref, lse_ref = merge_partials_ref(outs, lses)
    assert rel_err(o, o_ref) < 1e-14 and rel_err(lse, lse_ref) < 1e-14
    assert lse[1, 2, 5] == -math.inf and torch.all(o[1, 5, 2] == 0)
    got = torch.autograd.grad((o * do).sum() + (finite(lse) * dlse).sum(), outs + lses)

    # Plain formula on the rows where it is finite: softmax weights over the chunks.
    live = torch.ones(2, 3, 9, dtype=torch.bool)
    live[1, 2, 5] = False
    stacked = torch.stack(lses)
    w = torch.softmax(torch.where(live, stacked, torch.zeros_like(stacked)), dim=0)
    o_plain = sum(w_c.transpose(1, 2)[..., None] * o_c for w_c, o_c in zip(w, outs))
    lse_plain = torch.logsumexp(torch.where(live, stacked, torch.zeros_like(stacked)), dim=0)
    keep = live.transpose(1, 2)[..., None]
    loss = (o_plain * do * keep).sum() + (lse_plain * dlse * live).sum()
    want = torch.autograd.grad(loss, outs + lses)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-12
    assert torch.all(got[3 + 1][0, 0, :4] == 0)  # d lse of the empty chunk


def test_rows_that_see_no_key_give_zero_and_finite_gradients(launches):
    """Queries before the key chunk (causal) see nothing: o = 0, lse = -inf, and no NaN anywhere,
    forward or backward; a pair where no query sees any key is skipped without a launch."""
    q, k, v = rand(1, 50, 2, 16), rand(1, 40, 1, 16), rand(1, 40, 1, 16)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    do, dlse = rand(1, 50, 2, 16), rand(1, 2, 50)
    o, lse = flash_attn_chunk(q, k, v, q_offset=100, k_offset=120)  # queries 100..119 see nothing
    assert torch.all(o[:, :20] == 0) and torch.all(lse[..., :20] == -math.inf)
    assert torch.isfinite(lse[..., 20:]).all()
    grads = torch.autograd.grad((o * do).sum() + (finite(lse) * dlse).sum(), (q, k, v))
    want = reference(q, k, v, do, dlse, True, None, 100, 120)
    for name, got, ref in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *grads), want):
        assert torch.isfinite(finite(got)).all() and not torch.isnan(got).any(), name
        assert_close(name, got, ref)
    assert torch.all(grads[0][:, :20] == 0)

    n_fwd = launches["_attn_fwd_kernel"]
    o, lse = flash_attn_chunk_fwd(q, k, v, q_offset=0, k_offset=60)  # every key after every query
    assert torch.all(o == 0) and torch.all(lse == -math.inf) and launches["_attn_fwd_kernel"] == n_fwd
    dq, dk, dv = flash_attn_chunk_bwd(do, q, k, v, o, lse, 0, 60)
    assert all(torch.all(g == 0) for g in (dq, dk, dv))
    o, lse = flash_attn_chunk_fwd(
        q, k, v, q_offset=200, k_offset=0, window=100
    )  # every key left of the window
    assert torch.all(o == 0) and launches["_attn_fwd_kernel"] == n_fwd


def test_chunk_bwd_treats_lse_minus_inf_as_an_empty_row():
    """The backward's contract, shared with attention_bwd_ref: a row whose lse is -inf has P = 0, even
    where its keys are visible (no exp(+inf), no NaN)."""
    q, k, v = rand(1, 40, 2, 16), rand(1, 40, 2, 16), rand(1, 40, 2, 16)
    do = rand(1, 40, 2, 16)
    o, lse = flash_attn_chunk_fwd(q, k, v, 0, 0)
    lse[0, 1, 7] = -math.inf
    o[0, 7, 1] = 0.0
    # dO in another dtype than q (here fp64) is cast by the launcher.
    got = flash_attn_chunk_bwd(do.double(), q, k, v, o, lse, 0, 0)
    want = attention_bwd_ref(*(x.double() for x in (do, q, k, v, o, lse)), 0, 0, True, None, None)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert not torch.isnan(a).any(), name
        assert_close(name, a, b)
    assert torch.all(got[0][0, 7, 1] == 0)


def test_tolerance_catches_a_shifted_mask():
    """The comparison can fail: a kernel result computed with the key chunk one position off, or with
    one key perturbed, is far outside the tolerance."""
    q, k, v = rand(1, 100, 2, 16), rand(1, 100, 2, 16), rand(1, 100, 2, 16)
    o_ref, lse_ref = attention_ref(q.double(), k.double(), v.double(), return_lse=True)
    o, lse = flash_attn_chunk_fwd(q, k, v, q_offset=0, k_offset=1)
    assert rel_err(o, o_ref) > 100 * TOL and rel_err(lse[..., 1:], lse_ref[..., 1:]) > 100 * TOL
    k_bad = k.clone()
    k_bad[0, 37, 1, 5] += 0.5
    o = flash_attn(q, k_bad, v)
    assert rel_err(o, o_ref) > TOL


def test_invalid_inputs_raise_value_error():
    q, k = rand(1, 8, 3, 16), rand(1, 8, 2, 16)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash_attn(q, k, k)
    with pytest.raises(ValueError, match="window"):
        flash_attn(q, q, q, window=0)
    with pytest.raises(ValueError, match="same shape"):
        flash_attn(q, q, q[:, :4])
    with pytest.raises(ValueError, match="one dtype"), backend("triton"):
        flash_attn(q, q.half(), q)


def attention_lowp(q, k, v, causal, window):
    """Attention computed entirely in the inputs' low precision (matmuls, softmax, products): the error
    scale a bf16 kernel is allowed, a small multiple of (flash-attention's test convention)."""
    n_heads, scale = q.shape[2], q.shape[-1] ** -0.5
    qh = q.transpose(1, 2)
    kh = k.repeat_interleave(n_heads // k.shape[2], dim=2).transpose(1, 2)
    vh = v.repeat_interleave(n_heads // v.shape[2], dim=2).transpose(1, 2)
    s = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    allowed = position_mask(q.shape[1], k.shape[1], 0, 0, causal, window, q.device)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), vh).transpose(1, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "t,h,h_kv,d,causal,window",
    [(1000, 8, 2, 128, True, None), (2049, 4, 4, 64, True, 700), (777, 4, 1, 32, False, None)],
    ids=["T1000-GQA4-D128-causal", "T2049-D64-window", "T777-GQA4-D32-full"],
)
def test_flash_attn_low_precision_on_gpu(t, h, h_kv, d, causal, window, dtype, launches):
    """bf16/fp16 on the GPU: output and gradients within 2x (plus a floor) of the error that the same
    attention computed in PyTorch in that dtype makes against fp64."""
    q, k, v = (
        rand(2, t, h, d, dtype=dtype),
        rand(2, t, h_kv, d, dtype=dtype),
        rand(2, t, h_kv, d, dtype=dtype),
    )
    do = rand(2, t, h, d, dtype=dtype)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o = flash_attn(q, k, v, causal=causal, window=window)
    got = (o, *torch.autograd.grad((o * do).sum(), (q, k, v)))
    o_low = attention_lowp(q, k, v, causal, window)
    low = (o_low, *torch.autograd.grad((o_low * do).sum(), (q, k, v)))
    ref = reference(q, k, v, do, torch.zeros(2, h, t, device=DEVICE), causal, window)
    for name, g, lo, r in zip(("o", "dq", "dk", "dv"), got, low, (ref[0], *ref[2:])):
        bound = 2 * rel_err(lo, r) + 1e-3
        assert rel_err(g, r) < bound, (
            f"{name}: kernel {rel_err(g, r):.3g}, {dtype} reference {rel_err(lo, r):.3g}"
        )
    assert launches["_attn_fwd_kernel"] == 1 and launches["_attn_bwd_dkdv_kernel"] == 1
