"""The `flex` backend (FlexAttention) against the fp64 reference, and `auto`'s fallback from the check
cache. FlexAttention runs eagerly on CPU; its CPU backward is ours (FA2 formulas over the mask)."""

import json
import logging
import sys

import pytest
import torch

import longctx.kernels as K
from longctx.kernels.flash_attn.naive import attention_ref
from longctx.kernels.s2_attn.naive import s2_attn_ref

backend_mod = sys.modules["longctx.kernels.common.backend"]


def _qkv(b, t, h, h_kv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, t, n, d) for n in (h, h_kv, h_kv)]
    return [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]


def _grads(o, lse, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=g, dtype=o.dtype)
    dl = torch.randn(lse.shape, generator=g, dtype=lse.dtype)
    loss = (o * do).sum() + (lse.masked_fill(~torch.isfinite(lse), 0) * dl).sum()
    return torch.autograd.grad(loss, inputs)


def _close(flex_out, ref_out, tol=1e-10):
    for a, b in zip(flex_out, ref_out):
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))
        torch.testing.assert_close(a.nan_to_num(0, 0, 0), b.nan_to_num(0, 0, 0), atol=tol, rtol=0)


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("offsets", [(0, 0), (40, 8), (16, 30)])
def test_flex_dense_chunk_matches_fp64_reference(window, offsets):
    q, k, v = _qkv(2, 40, 4, 2, 8)  # GQA 4:2
    with K.backend("flex"):
        o, lse = K.flash_attn_chunk(q, k, v, *offsets, window=window)
    ref_o, ref_lse = attention_ref(q, k, v, True, None, window, True, *offsets)
    assert lse.dtype == torch.float64 and lse.shape == (2, 4, 40)
    _close([o, lse, *_grads(o, lse, (q, k, v))], [ref_o, ref_lse, *_grads(ref_o, ref_lse, (q, k, v))])


def test_flex_lse_is_natural_log_in_fp32():
    q, k, v = [x.detach().float() for x in _qkv(1, 24, 2, 2, 8)]
    with K.backend("flex"):
        _, lse = K.flash_attn(q, k, v, return_lse=True)
    scores = (q.double().transpose(1, 2) @ k.double().transpose(1, 2).transpose(-1, -2)) * 8**-0.5
    scores = scores.masked_fill(~torch.ones(24, 24, dtype=torch.bool).tril(), float("-inf"))
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), atol=1e-5, rtol=0)


def test_flex_chunk_bwd_with_merged_lse_matches_whole_row():
    """The ring's per-pair backward given the merged o, lse sums to the whole-sequence gradient."""
    q, k, v = _qkv(1, 32, 2, 1, 8)
    do = torch.randn(1, 32, 2, 8, dtype=torch.float64)
    o, lse = attention_ref(q, k, v, True, None, None, True)
    truth = torch.autograd.grad((o * do).sum(), (q, k, v))
    with K.backend("flex"):
        parts = [
            K.flash_attn_chunk_bwd(do, q, k[:, s : s + 16], v[:, s : s + 16], o, lse, 0, s) for s in (0, 16)
        ]
    torch.testing.assert_close(parts[0][0] + parts[1][0], truth[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]], 1), truth[1], atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.cat([parts[0][2], parts[1][2]], 1), truth[2], atol=1e-10, rtol=0)


@pytest.mark.parametrize("dense_heads", [0, 1])
def test_flex_s2_matches_fp64_reference(dense_heads):
    q, k, v = _qkv(1, 80, 4, 2, 8)
    args = dict(block_size=8, local_blocks=2, vert_stride=4, dense_heads=dense_heads)
    with K.backend("flex"):
        o, lse = K.s2_attn(q, k, v, return_lse=True, **args)
    ref_o, ref_lse = s2_attn_ref(q, k, v, return_lse=True, **args)
    _close([o, lse, *_grads(o, lse, (q, k, v))], [ref_o, ref_lse, *_grads(ref_o, ref_lse, (q, k, v))])


def test_flex_s2_shard_with_block_ids():
    """A context-parallel shard: query blocks (zigzag) against a gathered set of key blocks."""
    q, k, v = _qkv(1, 80, 4, 2, 8)
    q_ids, k_ids = [1, 2, 7, 8], [0, 1, 2, 3, 6, 7, 8]
    qs = q[:, [t for b in q_ids for t in range(b * 8, b * 8 + 8)]]
    ks, vs = [x[:, [t for b in k_ids for t in range(b * 8, b * 8 + 8)]] for x in (k, v)]
    qs, ks, vs = [x.detach().requires_grad_() for x in (qs, ks, vs)]
    args = dict(block_size=8, local_blocks=2, vert_stride=4, dense_heads=1, return_lse=True,
                q_block_ids=torch.tensor(q_ids), k_block_ids=torch.tensor(k_ids))  # fmt: skip
    with K.backend("flex"):
        o, lse = K.s2_attn(qs, ks, vs, **args)
    ref_o, ref_lse = s2_attn_ref(qs, ks, vs, **args)
    _close([o, lse, *_grads(o, lse, (qs, ks, vs))], [ref_o, ref_lse, *_grads(ref_o, ref_lse, (qs, ks, vs))])


def test_auto_falls_back_to_flex_when_check_failed(tmp_path, monkeypatch, caplog):
    """`auto` reads the `longctx check` cache: a failed op runs on flex (D, S) or the reference."""
    cache = tmp_path / "check.json"
    cache.write_text(json.dumps({"cpu-interpreter": {"ops": {"flash": False, "s2": True, "gla": False}}}))
    monkeypatch.setenv("LONGCTX_CHECK_CACHE", str(cache))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the Triton path is runnable here
    backend_mod.failed_ops.cache_clear()
    backend_mod._announced.clear()
    calls = []
    monkeypatch.setattr("longctx.kernels.flex.attention", lambda *a, **kw: calls.append(a) or (a[0], None))
    x = torch.zeros(1, 4, 1, 8)
    try:
        with K.backend("auto"), caplog.at_level(logging.WARNING, "longctx.kernels"):
            assert backend_mod.op_backend("flash", x) == "flex"
            assert backend_mod.op_backend("s2", x) == "triton"
            assert backend_mod.op_backend("gla", x) == "naive"
            assert backend_mod.op_backend("nsa", x) == "triton"
            K.flash_attn(x, x, x)
        assert len(calls) == 1
        assert "longctx check failed for flash" in caplog.text and "running it on flex" in caplog.text
        with K.backend("triton"):  # forcing Triton ignores the cache
            assert backend_mod.op_backend("flash", x) == "triton"
    finally:
        backend_mod.failed_ops.cache_clear()


def test_train_kernels_is_validated():
    from longctx.config import load_config

    assert load_config("configs/tiny.yaml", ["train.kernels=flex"]).train.kernels == "flex"
    with pytest.raises(ValueError, match="train.kernels"):
        load_config("configs/tiny.yaml", ["train.kernels=cuda"])


def test_flex_masks_documents_like_the_reference():
    """Packed documents (`cu_seqlens`, differing per sequence): FlexAttention's per-sequence BlockMask
    for dense chunks (with a window, at CP offsets) and for S2 equals the reference, gradients too."""
    q, k, v = _qkv(2, 40, 4, 2, 8)
    cu = torch.tensor([[0, 5, 23, 41, 80], [0, 31, 52, 53, 80]], dtype=torch.int32)
    for window, offsets in ((None, (40, 0)), (7, (16, 30)), (None, (0, 0))):
        with K.backend("flex"):
            o, lse = K.flash_attn_chunk(q, k, v, *offsets, window=window, cu_seqlens=cu)
        with K.backend("naive"):
            ref_o, ref_lse = K.flash_attn_chunk(q, k, v, *offsets, window=window, cu_seqlens=cu)
        ref = [ref_o, ref_lse, *_grads(ref_o, ref_lse, (q, k, v))]
        _close([o, lse, *_grads(o, lse, (q, k, v))], ref)
    cu = cu[:, :4].clamp(max=40)
    s2 = dict(block_size=4, local_blocks=2, vert_stride=3, return_lse=True, cu_seqlens=cu)
    with K.backend("flex"):
        o, lse = K.s2_attn(q, k, v, **s2)
    with K.backend("naive"):
        ref_o, ref_lse = K.s2_attn(q, k, v, **s2)
    _close([o, lse, *_grads(o, lse, (q, k, v))], [ref_o, ref_lse, *_grads(ref_o, ref_lse, (q, k, v))])
