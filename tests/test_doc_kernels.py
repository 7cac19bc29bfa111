"""Document masking in the kernels: a packed batch against each document run on its own.

Without CUDA the Triton kernels run under the interpreter (`TRITON_INTERPRET=1`, set for this module
only) in fp32, on tiny shapes; every test also runs the PyTorch reference path. References are fp64
and independent of the code under test: each document run alone (D, L), or alone at its global
offset (S, whose pattern counts global blocks), or explicit masks built here from the document
lengths (N). Rows hold documents shorter than a block, starting mid-block and at a block start.
Run: `.venv/bin/python -m pytest tests/test_doc_kernels.py`.
"""

import itertools

import pytest
import torch

from longctx.kernels import (
    backend,
    flash_attn,
    flash_attn_chunk,
    gated_linear_attn,
    nsa_cmp_attn,
    nsa_select_attn,
    nsa_select_blocks,
    s2_attn,
)
from longctx.kernels.flash_attn.naive import attention_ref
from longctx.kernels.gla.naive import gla_recurrent_ref
from longctx.kernels.s2_attn.naive import s2_attn_ref
from tests.conftest import rel_err

T = 64
# Row 0: a document shorter than a block (16), ones starting mid-block and one at a block start (32).
LENGTHS = [[5, 27, 3, 29], [30, 34]]
# fp32 kernels against fp64 references: the acceptance bound of the issue.
TOL = 1e-5
BACKENDS = ["naive", "triton"]


# Compiled on a GPU, interpreted on CPU (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("triton_kernels")


def cu_seqlens(lengths=LENGTHS, t=T) -> torch.Tensor:
    n = max(len(row) for row in lengths)
    cu = torch.full((len(lengths), n + 1), t, dtype=torch.int32)
    for b, row in enumerate(lengths):
        assert sum(row) == t
        cu[b, : len(row)] = torch.tensor(list(itertools.accumulate([0, *row[:-1]])), dtype=torch.int32)
    return cu


def documents(lengths=LENGTHS):
    """(row, start, length) of every document."""
    for b, row in enumerate(lengths):
        for start, n in zip(itertools.accumulate([0, *row[:-1]]), row):
            yield b, start, n


def doc_start_of(lengths=LENGTHS, t=T) -> torch.Tensor:
    """`[B, T]` each token's document start, written out from the lengths."""
    out = torch.zeros(len(lengths), t, dtype=torch.long)
    for b, start, n in documents(lengths):
        out[b, start : start + n] = start
    return out


def per_document(fn, inputs, do, dims=None):
    """Run `fn` on each document alone (fp64), scattering outputs and gradients back into place."""
    out = torch.zeros(do.shape, dtype=torch.float64)
    grads = [torch.zeros(x.shape, dtype=torch.float64) for x in inputs]
    for b, start, n in documents():
        part = [x[b : b + 1, start : start + n].double().detach().requires_grad_() for x in inputs]
        o = fn(part, start)
        o.backward(do[b : b + 1, start : start + n].double())
        out[b, start : start + n] = o[0].detach()
        for g, x in zip(grads, part):
            g[b, start : start + n] = x.grad[0]
    return out, grads


def run(fn, inputs, do, kernel):
    xs = [x.clone().requires_grad_() for x in inputs]
    with backend(kernel):
        o = fn(xs)
    o.backward(do)
    return o.detach(), [x.grad for x in xs]


def check(got, want):
    o, grads = got
    ref, ref_grads = want
    assert rel_err(o, ref) < TOL
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < TOL


@pytest.mark.parametrize("window", [None, 20], ids=["causal", "window20"])
@pytest.mark.parametrize("kernel", BACKENDS)
def test_flash_attn_documents_match_each_document_alone(kernel, window):
    q = torch.randn(2, T, 2, 16)
    k, v = torch.randn(2, T, 1, 16), torch.randn(2, T, 1, 16)
    do = torch.randn_like(q)
    got = run(lambda x: flash_attn(*x, window=window, cu_seqlens=cu_seqlens()), (q, k, v), do, kernel)
    check(got, per_document(lambda x, _: attention_ref(*x, window=window), (q, k, v), do))
    # The check can fail: without document masking the packed batch is not the documents alone.
    leaky = run(lambda x: flash_attn(*x, window=window), (q, k, v), do, kernel)
    assert rel_err(leaky[0], got[0]) > 1e-2


@pytest.mark.parametrize("kernel", BACKENDS)
@pytest.mark.parametrize("offsets", [(32, 0), (48, 16)], ids=["q32-k0", "q48-k16"])
def test_flash_attn_chunk_documents_at_global_offsets(kernel, offsets):
    q_off, k_off = offsets
    q, k, v = torch.randn(2, 16, 2, 16), torch.randn(2, 16, 1, 16), torch.randn(2, 16, 1, 16)
    do = torch.randn_like(q)
    starts = doc_start_of()
    q_pos, k_pos = torch.arange(q_off, q_off + 16), torch.arange(k_off, k_off + 16)
    # Key j is visible to query i iff causal and in i's document (it starts at or after i's start).
    mask = (k_pos[None, None, :] <= q_pos[None, :, None]) & (k_pos[None, None, :] >= starts[:, q_pos, None])

    def fn(x):
        o, lse = flash_attn_chunk(*x, q_off, k_off, cu_seqlens=cu_seqlens())
        return o

    got = run(fn, (q, k, v), do, kernel)
    xs = [x.double().requires_grad_() for x in (q, k, v)]
    ref = attention_ref(*xs, causal=False, mask=mask[:, None])
    ref.backward(do.double())
    check(got, (ref.detach(), [x.grad for x in xs]))


@pytest.mark.parametrize("kernel", BACKENDS)
def test_gla_documents_match_each_document_alone(kernel):
    q, k = torch.randn(2, T, 2, 16), torch.randn(2, T, 2, 16)
    v = torch.randn(2, T, 2, 16)
    g = -torch.rand(2, T, 2) * 0.5
    do = torch.randn_like(v)

    def fn(x):
        return gated_linear_attn(*x, cu_seqlens=cu_seqlens(), chunk_size=16)[0]

    got = run(fn, (q, k, v, g), do, kernel)
    check(got, per_document(lambda x, _: gla_recurrent_ref(*x)[0], (q, k, v, g), do))


@pytest.mark.parametrize("kernel", BACKENDS)
def test_s2_documents_match_each_document_alone_at_its_offset(kernel):
    # The S2 pattern counts blocks in global block positions: a document alone keeps its offset.
    bs, local, stride = 16, 1, 2
    q, k, v = torch.randn(2, T, 2, 16), torch.randn(2, T, 1, 16), torch.randn(2, T, 1, 16)
    do = torch.randn_like(q)

    def fn(x):
        return s2_attn(*x, bs, local, stride, 1, cu_seqlens=cu_seqlens())

    def alone(x, start):
        return s2_attn_ref(*x, bs, local, stride, 1, q_offset=start, k_offset=start)

    check(run(fn, (q, k, v), do, kernel), per_document(alone, (q, k, v), do))


def nsa_masks(lengths, t, n_cmp, cmp_block, cmp_stride):
    """`[B, T, Tc]`: compressed token `i` visible to query `p` iff its block ends at or before `p` and
    starts at or after `p`'s document start (blocks crossing a boundary are seen by neither side)."""
    starts = doc_start_of(lengths, t)
    pos = torch.arange(t)[None, :, None]
    first = torch.arange(n_cmp)[None, None, :] * cmp_stride
    return (first + cmp_block - 1 <= pos) & (first >= starts[:, :, None])


@pytest.mark.parametrize("kernel", BACKENDS)
def test_nsa_branches_keep_to_the_document(kernel):
    cmp_block, cmp_stride, slc_block, top = 16, 8, 16, 3
    n_cmp = (T - cmp_block) // cmp_stride + 1
    q = torch.randn(2, T, 2, 16)
    k_cmp, v_cmp = torch.randn(2, n_cmp, 1, 16), torch.randn(2, n_cmp, 1, 16)
    do = torch.randn_like(q)

    def cmp(x):
        return nsa_cmp_attn(*x, cmp_block, cmp_stride, cu_seqlens=cu_seqlens())

    got = run(cmp, (q, k_cmp, v_cmp), do, kernel)
    xs = [x.double().requires_grad_() for x in (q, k_cmp, v_cmp)]
    mask = nsa_masks(LENGTHS, T, n_cmp, cmp_block, cmp_stride)
    ref = attention_ref(*xs, causal=False, mask=mask[:, None])
    ref.backward(do.double())
    check(got, (ref.detach(), [x.grad for x in xs]))

    # Selection: only blocks of the query's document, its first block and the local ones forced.
    with backend(kernel):
        _, lse = nsa_cmp_attn(
            q, k_cmp, v_cmp, cmp_block, cmp_stride, return_lse=True, cu_seqlens=cu_seqlens()
        )
        idx = nsa_select_blocks(q, k_cmp, lse, cmp_block, cmp_stride, slc_block, top, cu_seqlens=cu_seqlens())
    first = (doc_start_of() // slc_block)[:, :, None, None]
    own = (torch.arange(T) // slc_block)[None, :, None, None]
    listed = idx >= 0
    assert bool(((idx >= first) & (idx <= own) | ~listed).all())
    assert bool((idx == first).any(-1).all()) and bool((idx == own).any(-1).all())

    # Selected attention: the listed blocks, causal, from the query's document start on.
    k, v = torch.randn(2, T, 1, 16), torch.randn(2, T, 1, 16)
    got = run(lambda x: nsa_select_attn(*x, idx, slc_block, cu_seqlens=cu_seqlens()), (q, k, v), do, kernel)
    member = torch.zeros(2, T, 1, T // slc_block + 1, dtype=torch.bool)
    member.scatter_(-1, torch.where(idx < 0, T // slc_block, idx).long(), True)
    in_list = member[..., torch.arange(T) // slc_block].repeat_interleave(2, dim=2).permute(0, 2, 1, 3)
    pos = torch.arange(T)
    same_doc = (pos[None, None, :] <= pos[None, :, None]) & (pos[None, None, :] >= doc_start_of()[:, :, None])
    xs = [x.double().requires_grad_() for x in (q, k, v)]
    ref = attention_ref(*xs, causal=False, mask=in_list & same_doc[:, None])
    ref.backward(do.double())
    check(got, (ref.detach(), [x.grad for x in xs]))
