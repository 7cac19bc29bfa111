"""Gated linear attention: the chunked Triton kernels against an fp64 step recurrence.

Without CUDA the kernels run under the Triton interpreter (`TRITON_INTERPRET=1`, set by a fixture for
this module only, before the kernel module is imported: `longctx.kernels.gla` imports it on first
use), in fp32; on a GPU machine the same tests run the compiled kernels. Every kernel-allocated
buffer is filled with NaN first, so a skipped write fails.
Run: `.venv/bin/python -m pytest tests/test_gla.py`.
"""

import pytest
import torch

from longctx.config import load_config
from longctx.kernels import backend, gated_linear_attn, gated_linear_attn_step
from longctx.kernels.gla.naive import gla_recurrent_ref
from longctx.model import build_model
from tests.conftest import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The acceptance bound (fp32 kernel vs fp64 recurrence); the fp32 recurrence itself lands at 1e-7 to
# 7e-7 on these inputs, so the bound leaves room for the chunked form's different summation order.
TOL = 1e-4
# Besides the absolute bound: the kernel's error must stay within this multiple of the fp32
# recurrence's own error (floored at fp32 resolution, for outputs where that error is ~0).
REF_MULTIPLE = 10


# Compiled on a GPU, interpreted on CPU; every kernel buffer starts as NaN (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("triton_kernels", "nan_buffers")


@pytest.fixture
def chunk_module(triton_kernels):
    """The kernel module, imported with the interpreter on where there is no GPU."""
    from longctx.kernels.gla import chunk

    return chunk


def make_inputs(b, t, h, dk, dv, decay, with_state, dtype=torch.float64):
    q, k = (torch.randn(b, t, h, dk, dtype=dtype) for _ in range(2))
    v = torch.randn(b, t, h, dv, dtype=dtype)
    if decay == "weak":  # the state carries across the whole sequence
        g = -0.1 * torch.rand(b, t, h, dtype=dtype)
    elif decay == "strong":  # per-step decay around exp(-20): each token nearly forgets the past
        g = -20.0 + 2.0 * (torch.rand(b, t, h, dtype=dtype) - 0.5)
    else:  # "mixed": strong steps among weak ones, so long spans and near-zero decays share a chunk
        g = torch.where(torch.rand(b, t, h) < 0.3, -20.0, -0.05).to(dtype) * torch.rand(b, t, h, dtype=dtype)
    s0 = torch.randn(b, h, dk, dv, dtype=dtype) if with_state else None
    return q, k, v, g, s0


def run_with_grads(fn, q, k, v, g, s0, do, ds, dtype, device):
    """Output, final state and the gradients of `sum(o * do) + sum(S_T * ds)` w.r.t. every input."""
    leaves = [x.detach().to(device, dtype).requires_grad_() for x in (q, k, v, g)]
    state = None if s0 is None else s0.detach().to(device, dtype).requires_grad_()
    o, s = fn(*leaves, initial_state=state)
    loss = (o * do.to(device, o.dtype)).sum() + (s * ds.to(device, s.dtype)).sum()
    inputs = leaves + ([state] if state is not None else [])
    grads = torch.autograd.grad(loss, inputs)
    return [o, s, *grads]


NAMES = ["o", "final_state", "dq", "dk", "dv", "dg", "d_initial_state"]


def compare_with_recurrence(q, k, v, g, s0, chunk_size):
    """Errors of the kernel (fp32) and of the fp32 recurrence against the fp64 recurrence."""
    torch.manual_seed(1)
    do = torch.randn(v.shape, dtype=torch.float64)
    ds = torch.randn(q.shape[0], q.shape[2], q.shape[3], v.shape[3], dtype=torch.float64)

    def ref(*args, initial_state):
        return gla_recurrent_ref(*args, initial_state=initial_state, output_final_state=True)

    def kernel(*args, initial_state):
        return gated_linear_attn(
            *args, initial_state=initial_state, output_final_state=True, chunk_size=chunk_size
        )

    exact = run_with_grads(ref, q, k, v, g, s0, do, ds, torch.float64, "cpu")
    ref32 = run_with_grads(ref, q, k, v, g, s0, do, ds, torch.float32, "cpu")
    with backend("triton"):
        got = run_with_grads(kernel, q, k, v, g, s0, do, ds, torch.float32, DEVICE)
    return {name: (rel_err(a.cpu(), e), rel_err(r, e)) for name, a, r, e in zip(NAMES, got, ref32, exact)}


def assert_close(errors):
    for name, (err, ref_err) in errors.items():
        assert err < TOL, f"{name}: relative error {err:.2e} >= {TOL}"
        bound = REF_MULTIPLE * max(ref_err, 1e-7)
        assert err < bound, f"{name}: {err:.2e} > {REF_MULTIPLE}x the fp32 recurrence's {ref_err:.2e}"


# A covering set rather than the full product (the interpreter is slow): every T meets every chunk
# size, every decay and both initial-state settings at least once.
CASES = [
    (1, 16, "weak", True),
    (1, 64, "strong", False),
    (63, 16, "weak", False),
    (63, 32, "strong", True),
    (63, 64, "mixed", True),
    (64, 16, "strong", True),
    (64, 32, "weak", False),
    (64, 64, "mixed", False),
    (200, 16, "mixed", True),
    (200, 32, "weak", True),
    (200, 64, "strong", False),
]


@pytest.mark.parametrize(
    "t,chunk,decay,with_state",
    CASES,
    ids=[f"T{t}-C{c}-{d}-{'h0' if s else 'no_h0'}" for t, c, d, s in CASES],
)
def test_gated_linear_attn_matches_recurrence(t, chunk, decay, with_state):
    q, k, v, g, s0 = make_inputs(1, t, 2, 32, 16, decay, with_state)
    assert_close(compare_with_recurrence(q, k, v, g, s0, chunk))


def test_gated_linear_attn_matches_recurrence_over_tiles():
    """Batch 2, Dk=40 and Dv=48: not multiples of the interpreter's 32-wide tiles, so the kernels loop
    over partial K and V tiles and the dg partials of two K tiles are summed."""
    q, k, v, g, s0 = make_inputs(2, 70, 2, 40, 48, "mixed", True)
    assert_close(compare_with_recurrence(q, k, v, g, s0, 32))


def test_gated_linear_attn_check_fires_on_a_wrong_decay(monkeypatch):
    """The comparison above can fail: a reference fed one token's decay off by 1e-2 is caught."""
    q, k, v, g, s0 = make_inputs(1, 40, 2, 32, 16, "weak", True)
    wrong = g.clone()
    wrong[0, 30, 1] -= 1e-2
    real_ref = gla_recurrent_ref

    def ref_with_wrong_decay(q_, k_, v_, g_, **kwargs):
        return real_ref(q_, k_, v_, wrong.to(g_.dtype) + 0 * g_, **kwargs)

    monkeypatch.setattr(f"{__name__}.gla_recurrent_ref", ref_with_wrong_decay)
    errors = compare_with_recurrence(q, k, v, g, s0, 32)
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(errors)


def test_gated_linear_attn_final_state_gradient_alone():
    """A loss on the final state only (the output unused, as under context parallelism)."""
    q, k, v, g, s0 = make_inputs(1, 70, 2, 32, 16, "weak", True)
    target = torch.randn(1, 2, 32, 16, dtype=torch.float64)

    def grads(fn, dtype, device):
        q_ = q.to(device, dtype).requires_grad_()
        leaves = [x.to(device, dtype).requires_grad_() for x in (k, v, g, s0)]
        _, s = fn(q_, *leaves[:3], initial_state=leaves[3], output_final_state=True)
        dq, *rest = torch.autograd.grad(
            (s * target.to(device, s.dtype)).sum(), [q_, *leaves], allow_unused=True
        )
        return dq, [s, *rest]

    _, exact = grads(gla_recurrent_ref, torch.float64, "cpu")
    with backend("triton"):
        dq, got = grads(lambda *a, **kw: gated_linear_attn(*a, chunk_size=32, **kw), torch.float32, DEVICE)
    # The final state does not depend on the queries.
    assert torch.equal(dq, torch.zeros_like(dq))
    for name, a, e in zip(["final_state", "dk", "dv", "dg", "d_initial_state"], got, exact):
        assert rel_err(a.cpu(), e) < TOL, name


def test_gated_linear_attn_split_with_state_passing_equals_whole():
    """Two calls, the second starting from the first's final state, give the whole call's outputs
    and, backward through the passed state, the whole call's gradients."""
    q, k, v, g, s0 = make_inputs(1, 150, 2, 32, 32, "weak", True, dtype=torch.float32)
    do, ds = torch.randn(1, 150, 2, 32), torch.randn(1, 2, 32, 32)

    def run(split):
        leaves = [x.to(DEVICE).requires_grad_() for x in (q, k, v, g, s0)]
        qq, kk, vv, gg, state = leaves
        outs = []
        for lo, hi in [(0, split), (split, 150)] if split else [(0, 150)]:
            o, state = gated_linear_attn(
                qq[:, lo:hi], kk[:, lo:hi], vv[:, lo:hi], gg[:, lo:hi], initial_state=state,
                output_final_state=True, chunk_size=32,
            )  # fmt: skip
            outs.append(o)
        o = torch.cat(outs, 1)
        loss = (o * do.to(DEVICE)).sum() + (state * ds.to(DEVICE)).sum()
        return [o, state, *torch.autograd.grad(loss, leaves)]

    with backend("triton"):
        whole, split = run(None), run(70)
    for name, a, b in zip(NAMES[:2] + ["dq", "dk", "dv", "dg", "d_initial_state"], split, whole):
        # Both sides are fp32 kernel results; they differ only in summation order.
        assert rel_err(a.cpu(), b.cpu()) < 1e-5, name


def test_gated_linear_attn_step_continues_the_chunked_form():
    q, k, v, g, _ = make_inputs(2, 45, 2, 16, 24, "mixed", False, dtype=torch.float32)
    with backend("triton"):
        whole, s_whole = gated_linear_attn(q, k, v, g, output_final_state=True, chunk_size=16)
        _, state = gated_linear_attn(q[:, :40], k[:, :40], v[:, :40], g[:, :40], output_final_state=True)
    for t in range(40, 45):
        o_t, state = gated_linear_attn_step(q[:, t], k[:, t], v[:, t], g[:, t], state)
        assert rel_err(o_t, whole[:, t]) < 1e-5
    assert rel_err(state, s_whole) < 1e-5
    # From an empty state the step is o = scale * q (k^T v).
    o_1, _ = gated_linear_attn_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], None)
    assert rel_err(o_1, whole[:, 0]) < 1e-5


def test_gated_linear_attn_runs_the_triton_kernels(monkeypatch, chunk_module):
    """The public op launches the kernels (forward and backward) unless the reference is forced."""
    calls = []
    for name in ("chunk_gla_fwd", "chunk_gla_bwd"):
        real = getattr(chunk_module, name)
        monkeypatch.setattr(
            chunk_module, name, lambda *a, _f=real, _n=name, **kw: calls.append(_n) or _f(*a, **kw)
        )
    q, k, v, g, _ = make_inputs(1, 20, 2, 16, 16, "weak", False, dtype=torch.float32)
    q.requires_grad_()
    o, final_state = gated_linear_attn(q, k, v, g)
    o.sum().backward()
    assert final_state is None
    assert calls == ["chunk_gla_fwd", "chunk_gla_bwd"]
    with backend("naive"):
        gated_linear_attn(q, k, v, g)[0].sum().backward()
    assert calls == ["chunk_gla_fwd", "chunk_gla_bwd"]


def test_gated_linear_attn_rejects_bad_arguments():
    q, k, v, g, _ = make_inputs(1, 20, 2, 16, 8, "weak", False, dtype=torch.float32)
    with pytest.raises(ValueError, match="chunk_size"):
        gated_linear_attn(q, k, v, g, chunk_size=48)
    with pytest.raises(ValueError, match="g must be"):
        gated_linear_attn(q, k, v, g[:, :10])
    with pytest.raises(ValueError, match="initial_state"):
        gated_linear_attn(q, k, v, g, initial_state=torch.zeros(1, 2, 8, 16))


def test_linear_mixer_triton_matches_reference_backend():
    """The L layer of a tiny model gives the same logits and gradients on either backend."""
    cfg = load_config(None, ["model.vocab_size=64", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2",
                             "model.n_layers=1", "model.layers=L", "data.seq_len=64"])  # fmt: skip
    model = build_model(cfg.model).to(DEVICE)
    tokens = torch.randint(0, 64, (2, 50), device=DEVICE)
    results = {}
    for name in ("naive", "triton"):
        model.zero_grad()
        with backend(name):
            logits = model(tokens)
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
        results[name] = [logits.detach()] + [p.grad.clone() for p in model.parameters()]
    for a, b in zip(results["triton"], results["naive"]):
        assert rel_err(a, b) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gated_linear_attn_16bit_on_gpu(dtype):
    """16-bit inputs (fp32 state and accumulation) stay within a small multiple of the error of the
    fp32 recurrence fed the same rounded inputs."""
    q, k, v, g, s0 = make_inputs(2, 1000, 4, 128, 64, "mixed", True)
    q, k, v = (x.to(dtype).double() for x in (q, k, v))
    do = torch.randn(v.shape, dtype=torch.float64)
    ds = torch.randn(s0.shape, dtype=torch.float64)

    def kernel(*args, initial_state):
        return gated_linear_attn(*args, initial_state=initial_state, output_final_state=True)

    def ref(*args, initial_state):
        return gla_recurrent_ref(*args, initial_state=initial_state, output_final_state=True)

    exact = run_with_grads(ref, q, k, v, g, s0, do, ds, torch.float64, "cpu")
    leaves = [x.to("cuda", dtype).requires_grad_() for x in (q, k, v)]
    gg, state = g.float().cuda().requires_grad_(), s0.float().cuda().requires_grad_()
    o, s = kernel(*leaves, gg, initial_state=state)
    loss = (o.float() * do.cuda().float()).sum() + (s * ds.cuda().float()).sum()
    got = [o, s, *torch.autograd.grad(loss, leaves + [gg, state])]
    for name, a, e in zip(NAMES, got, exact):
        # bf16 keeps 8 bits: per-element rounding of the 16-bit operands is ~4e-3 relative.
        assert rel_err(a.float().cpu(), e) < 2e-2, name
