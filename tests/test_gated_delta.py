"""Gated delta rule: the chunked Triton forward and backward kernels and the chunked PyTorch form
against an fp64 brute force of the product form `S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1}
+ beta_t k_t v_t^T`, written here independently of `longctx.kernels`.

Without CUDA the kernel runs under the Triton interpreter (`TRITON_INTERPRET=1`, set by a fixture for
this module only), in fp32; on a GPU machine the same tests run the compiled kernel. Kernel outputs
are allocated NaN-filled, so a skipped write fails.
Run: `.venv/bin/python -m pytest tests/test_gated_delta.py`.
"""

import pytest
import torch
import torch.nn.functional as F

from longctx.kernels import backend, gated_delta_rule, gated_delta_rule_step
from longctx.kernels.gated_delta.naive import gated_delta_chunk_ref, gated_delta_recurrent_ref
from tests.conftest import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 kernel vs fp64 brute force (the acceptance bound); the fp32 recurrence lands near 1e-7 here.
TOL = 1e-4


# Compiled on a GPU, interpreted on CPU; every kernel buffer starts as NaN (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("triton_kernels", "nan_buffers")


@pytest.fixture
def chunk_module(triton_kernels):
    """The kernel module, imported with the interpreter on where there is no GPU."""
    from longctx.kernels.gated_delta import chunk

    return chunk


def brute_force(q, k, v, g, beta, initial_state, scale=None):
    """fp64, one token at a time, in the product form (not the delta form the op's reference uses)."""
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, t, h, dk = q.shape
    state = initial_state.double() if initial_state is not None else q.new_zeros(b, h, dk, v.shape[-1])
    eye = torch.eye(dk, dtype=torch.float64)
    outs = []
    for i in range(t):
        kk = torch.einsum("bhk,bhj->bhkj", k[:, i], k[:, i])
        transition = torch.exp(g[:, i])[..., None, None] * (eye - beta[:, i, :, None, None] * kk)
        write = beta[:, i, :, None, None] * torch.einsum("bhk,bhv->bhkv", k[:, i], v[:, i])
        state = transition @ state + write
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", state, q[:, i]))
    return torch.stack(outs, 1), state


def make_inputs(b, t, h, dk, dv, decay, with_state, dtype=torch.float64):
    q = F.normalize(torch.randn(b, t, h, dk, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(b, t, h, dk, dtype=dtype), dim=-1)
    v = torch.randn(b, t, h, dv, dtype=dtype)
    if decay == "weak":
        g = -0.1 * torch.rand(b, t, h, dtype=dtype)
    else:  # "mixed": near-total forgetting among weak steps, so long spans and ~0 decays share a chunk
        g = torch.where(torch.rand(b, t, h) < 0.3, -20.0, -0.05).to(dtype) * torch.rand(b, t, h, dtype=dtype)
    beta = torch.rand(b, t, h, dtype=dtype)
    s0 = torch.randn(b, h, dk, dv, dtype=dtype) if with_state else None
    return q, k, v, g, beta, s0


NAMES = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "d_initial_state"]


def run_with_grads(fn, inputs, s0, do, ds, dtype, device):
    """Output, final state and the gradients of `sum(o * do) + sum(S_T * ds)` w.r.t. every input."""
    leaves = [x.detach().to(device, dtype).requires_grad_() for x in inputs]
    state = None if s0 is None else s0.detach().to(device, dtype).requires_grad_()
    o, s = fn(*leaves, initial_state=state)
    loss = (o * do.to(device, o.dtype)).sum() + (s * ds.to(device, s.dtype)).sum()
    grads = torch.autograd.grad(loss, leaves + ([state] if state is not None else []))
    return [o, s, *grads]


def errors_against_brute_force(fn, q, k, v, g, beta, s0, dtype=torch.float32, device=DEVICE):
    torch.manual_seed(1)
    do = torch.randn(v.shape, dtype=torch.float64)
    ds = torch.randn(q.shape[0], q.shape[2], q.shape[3], v.shape[3], dtype=torch.float64)

    def exact_fn(*args, initial_state):
        return brute_force(*args, initial_state)

    exact = run_with_grads(exact_fn, (q, k, v, g, beta), s0, do, ds, torch.float64, "cpu")
    got = run_with_grads(fn, (q, k, v, g, beta), s0, do, ds, dtype, device)
    return {name: rel_err(a.detach().cpu(), e.detach()) for name, a, e in zip(NAMES, got, exact)}


def assert_close(errors, tol=TOL):
    for name, err in errors.items():
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"


@pytest.mark.parametrize("t,chunk", [(1, 16), (45, 16), (64, 32), (100, 64)], ids=lambda x: str(x))
def test_gated_delta_references_match_brute_force(t, chunk):
    """Both references in fp64: the token recurrence and the chunked UT-transform form."""
    q, k, v, g, beta, s0 = make_inputs(2, t, 2, 8, 6, "mixed", True)

    def recurrent(*args, initial_state):
        return gated_delta_recurrent_ref(*args, initial_state=initial_state, output_final_state=True)

    def chunked(*args, initial_state):
        return gated_delta_chunk_ref(
            *args, initial_state=initial_state, output_final_state=True, chunk_size=chunk
        )

    for fn in (recurrent, chunked):
        assert_close(errors_against_brute_force(fn, q, k, v, g, beta, s0, torch.float64, "cpu"), 1e-10)


CASES = [(37, 16, "weak", True, 16), (40, 32, "mixed", True, 24), (20, 16, "mixed", False, 32)]


@pytest.mark.parametrize(
    "t,chunk,decay,with_state,dk",
    CASES,
    ids=[f"T{t}-C{c}-{d}-{'h0' if s else 'no_h0'}-K{dk}" for t, c, d, s, dk in CASES],
)
def test_gated_delta_rule_matches_brute_force(t, chunk, decay, with_state, dk):
    """The Triton path in fp32 (forward and backward kernels): o, final state and all six gradients
    within 1e-4 of fp64. Dv = 24 spans two of the interpreter's 16-wide Dv tiles; Dk = 24 and 32 span
    two of the backward's 16-wide Dk tiles (24: a partial one)."""
    q, k, v, g, beta, s0 = make_inputs(1, t, 2, dk, 24, decay, with_state)

    def kernel(*args, initial_state):
        return gated_delta_rule(*args, initial_state=initial_state, output_final_state=True, chunk_size=chunk)

    with backend("triton"):
        assert_close(errors_against_brute_force(kernel, q, k, v, g, beta, s0))


def test_gated_delta_check_fires_on_a_wrong_beta():
    """The comparison can fail: one token's beta off by 1e-2 is caught."""
    q, k, v, g, beta, s0 = make_inputs(1, 20, 2, 8, 8, "weak", True)
    wrong = beta.clone()
    wrong[0, 15, 1] += 1e-2

    def off(q_, k_, v_, g_, beta_, initial_state):
        return gated_delta_chunk_ref(
            q_, k_, v_, g_, wrong + 0 * beta_, initial_state=initial_state, output_final_state=True,
            chunk_size=16,
        )  # fmt: skip

    with pytest.raises(AssertionError, match="relative error"):
        assert_close(errors_against_brute_force(off, q, k, v, g, beta, s0, torch.float64, "cpu"))


# Packed documents (lengths per row, T = 40): row 0 has one shorter than a chunk (16), starts mid-chunk
# and at a chunk start (16, 32); row 1 has two.
DOC_LENGTHS = [[5, 11, 3, 13, 8], [30, 10]]


@pytest.mark.parametrize("kernel", ["naive", "triton"])
def test_gated_delta_documents_match_each_document_alone(kernel):
    """With `cu_seqlens` the packed rows equal each document run alone from a zero state (the fp64
    brute force), in fp32: o, the final state (the last document's) and all six gradients. The
    initial state is dropped at token 0 (a document start): its gradient is exactly 0."""
    t, h, dk, dv = 40, 1, 16, 16
    q, k, v, g, beta, s0 = make_inputs(2, t, h, dk, dv, "mixed", True, dtype=torch.float32)
    cu = torch.full((2, 6), t, dtype=torch.int32)
    docs = []
    for row, lengths in enumerate(DOC_LENGTHS):
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        cu[row, : len(starts)] = torch.tensor(starts, dtype=torch.int32)
        docs += [(row, start, n) for start, n in zip(starts, lengths)]
    do, ds = torch.randn(2, t, h, dv), torch.randn(2, h, dk, dv)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta, s0)]
    with backend(kernel):
        o, state = gated_delta_rule(
            *leaves[:5], initial_state=leaves[5], output_final_state=True, chunk_size=16, cu_seqlens=cu
        )
    ((o * do).sum() + (state * ds).sum()).backward()
    ref_o = torch.zeros(o.shape, dtype=torch.float64)
    ref_state = torch.zeros(state.shape, dtype=torch.float64)
    ref_grads = [torch.zeros(x.shape, dtype=torch.float64) for x in leaves[:5]]
    for row, start, n in docs:
        part = [x[row : row + 1, start : start + n].double().requires_grad_() for x in (q, k, v, g, beta)]
        o_doc, s_doc = brute_force(*part, None)
        loss = (o_doc * do[row : row + 1, start : start + n].double()).sum()
        if start + n == t:
            loss = loss + (s_doc * ds[row : row + 1].double()).sum()
            ref_state[row] = s_doc[0].detach()
        loss.backward()
        ref_o[row, start : start + n] = o_doc[0].detach()
        for ref, x in zip(ref_grads, part):
            ref[row, start : start + n] = x.grad[0]
    errors = {"o": rel_err(o.detach(), ref_o), "final_state": rel_err(state.detach(), ref_state)}
    errors.update({name: rel_err(x.grad, ref) for name, x, ref in zip(NAMES[2:], leaves, ref_grads)})
    assert_close(errors)
    assert torch.count_nonzero(leaves[5].grad) == 0


def test_gated_delta_step_continues_the_chunked_form():
    q, k, v, g, beta, _ = make_inputs(2, 21, 2, 16, 16, "mixed", False, dtype=torch.float32)
    with backend("triton"):
        whole, s_whole = gated_delta_rule(q, k, v, g, beta, output_final_state=True, chunk_size=16)
        _, state = gated_delta_rule(
            q[:, :17], k[:, :17], v[:, :17], g[:, :17], beta[:, :17], output_final_state=True, chunk_size=16
        )
    for t in range(17, 21):
        o_t, state = gated_delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        assert rel_err(o_t, whole[:, t]) < 1e-5
    assert rel_err(state, s_whole) < 1e-5
    o_1, _ = gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], None)
    assert rel_err(o_1, whole[:, 0]) < 1e-5


def test_gated_delta_rule_runs_the_triton_kernel(monkeypatch, chunk_module):
    """The public op launches the forward and backward kernels unless the reference is forced."""
    calls = []
    for name in ("chunk_gated_delta_fwd", "chunk_gated_delta_bwd"):
        real = getattr(chunk_module, name)
        monkeypatch.setattr(
            chunk_module, name, lambda *a, _n=name, _f=real, **kw: calls.append(_n[-3:]) or _f(*a, **kw)
        )
    q, k, v, g, beta, _ = make_inputs(1, 20, 2, 16, 16, "weak", False, dtype=torch.float32)
    q.requires_grad_()
    o, final_state = gated_delta_rule(q, k, v, g, beta, chunk_size=16)
    o.sum().backward()
    assert final_state is None and calls == ["fwd", "bwd"]
    with backend("naive"):
        gated_delta_rule(q, k, v, g, beta)[0].sum().backward()
    assert calls == ["fwd", "bwd"]


def test_gated_delta_rule_rejects_bad_arguments():
    q, k, v, g, beta, _ = make_inputs(1, 20, 2, 16, 8, "weak", False, dtype=torch.float32)
    with pytest.raises(ValueError, match="chunk_size"):
        gated_delta_rule(q, k, v, g, beta, chunk_size=48)
    with pytest.raises(ValueError, match="beta must be"):
        gated_delta_rule(q, k, v, g, beta[:, :10])
    with pytest.raises(ValueError, match="initial_state"):
        gated_delta_rule(q, k, v, g, beta, initial_state=torch.zeros(1, 2, 8, 16))


def test_delta_mixer_triton_matches_reference_backend():
    """The G layer of a tiny model gives the same logits and gradients on either backend."""
    from longctx.config import load_config
    from longctx.model import build_model

    cfg = load_config(None, ["model.vocab_size=64", "model.dim=32", "model.n_heads=2", "model.n_kv_heads=1",
                             "model.n_layers=1", "model.layers=G", "data.seq_len=64"])  # fmt: skip
    model = build_model(cfg.model).to(DEVICE)
    tokens = torch.randint(0, 64, (1, 40), device=DEVICE)
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
def test_gated_delta_rule_16bit_on_gpu(dtype):
    """16-bit inputs (fp32 state and accumulation) stay near the fp64 result of the rounded inputs."""
    q, k, v, g, beta, s0 = make_inputs(2, 1000, 4, 128, 64, "mixed", True)
    q, k, v = (x.to(dtype).double() for x in (q, k, v))

    def kernel(*args, initial_state):
        args = [a.to(dtype) if i < 3 else a.float() for i, a in enumerate(args)]
        return gated_delta_rule(*args, initial_state=initial_state, output_final_state=True)

    errors = errors_against_brute_force(kernel, q, k, v, g, beta, s0, torch.float32, "cuda")
    assert_close(errors, 2e-2)
