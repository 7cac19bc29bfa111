"""What the interpreter tests cannot see: host synchronisation in the kernel wrappers and int32 offsets.

- Host sync: each op's forward and backward run twice with every Triton kernel swapped for a no-op
  launch, under a `TorchDispatchMode` that records the ATen ops the wrapper code calls (index building,
  tile lists, plans). After the first call with a shape, none may force the host to wait for the
  device: no `.item()`, `nonzero`, `unique`, boolean-mask indexing, `bincount`, `masked_select`,
  `repeat_interleave` without `output_size`, device-to-host copies.
- Offsets: the offset helpers of every kernel run under the interpreter at the largest indices a
  launch with B=1, T=2^20 (2^22 for GLA), H=32, D=128 produces, and must give the exact Python
  integer (int32 arithmetic would wrap).
"""

import contextlib
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import longctx.kernels as K

FORBIDDEN = {
    "_local_scalar_dense": "a tensor read on the host (.item(), bool(), int())",
    "nonzero": "nonzero (data-dependent size)",
    "masked_select": "masked_select (data-dependent size)",
    "bincount": "bincount (syncs on CUDA)",
    "equal": "torch.equal (returns a host bool)",
    "is_nonzero": "bool(tensor)",
}

KERNELS = {
    "longctx.kernels.flash_attn.triton": [
        "_attn_fwd_kernel", "_attn_bwd_pre_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
    ],
    "longctx.kernels.s2_attn.triton": [
        "_s2_fwd_kernel", "_s2_bwd_preprocess_kernel", "_s2_bwd_dq_kernel", "_s2_bwd_dkdv_kernel",
    ],
    "longctx.kernels.nsa.triton.select_attn": [
        "_select_fwd_kernel", "_select_bwd_dq_kernel", "_select_bwd_dkdv_kernel",
        "_select_bwd_dkdv_sum_kernel",
    ],
    "longctx.kernels.nsa.triton.cmp_attn": ["_cmp_fwd_kernel", "_cmp_bwd_dq_kernel", "_cmp_bwd_dkdv_kernel"],
    "longctx.kernels.nsa.triton.select_blocks": ["_select_blocks_kernel"],
    "longctx.kernels.nsa.triton.common": ["_softmax_delta_kernel"],
    "longctx.kernels.gla.chunk": [
        "chunk_local_cumsum_kernel", "chunk_fwd_h_kernel", "chunk_fwd_o_kernel", "chunk_bwd_dh_kernel",
        "chunk_bwd_dv_kernel", "chunk_bwd_dqk_kernel",
    ],
    "longctx.kernels.gated_delta.chunk": [
        "chunk_gated_delta_fwd_kernel", "chunk_gated_delta_bwd_dh_kernel", "chunk_gated_delta_bwd_kernel",
    ],
}  # fmt: skip


class _NoLaunch:
    """`kernel[grid](...)` does nothing: the wrapper code runs, no kernel does."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _sync_reason(func, args, kwargs) -> str | None:
    name = func._schema.name.split("::")[-1]
    if name in FORBIDDEN:
        return FORBIDDEN[name]
    if name.startswith("unique") or name.startswith("_unique"):
        return "unique (data-dependent size)"
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices):
            return "boolean-mask indexing (nonzero inside)"
    if name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) < 4:
        return "repeat_interleave without output_size"
    if name == "_to_copy" and "device" in kwargs and isinstance(args[0], torch.Tensor):
        if torch.device(kwargs["device"]).type != args[0].device.type:
            return "a copy between devices"
    if name == "copy_" and args[0].device.type != args[1].device.type:
        return "a copy between devices"
    return None


class SyncRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bad: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = _sync_reason(func, args, kwargs)
        if reason is not None:
            self.bad.append(f"{func}: {reason}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the Triton path runs on CPU tensors
    for module_name, names in KERNELS.items():
        module = importlib.import_module(module_name)
        for name in names:
            monkeypatch.setattr(module, name, _NoLaunch())
    with K.backend("triton"):
        yield


def _qkv(t=128, h=4, h_kv=2, d=32):
    q = torch.randn(1, t, h, d, requires_grad=True)
    k = torch.randn(1, t, h_kv, d, requires_grad=True)
    v = torch.randn(1, t, h_kv, d, requires_grad=True)
    return q, k, v


def _flash():
    q, k, v = _qkv()
    o, lse = K.flash_attn_chunk(q, k, v, q_offset=128, k_offset=64, window=96)
    (o.sum() + lse.sum()).backward()
    o = K.flash_attn(q, k, v)
    o.sum().backward()


def _s2():
    q, k, v = _qkv()
    ids = torch.tensor([2, 3, 4, 5])
    o, lse = K.s2_attn(q, k, v, block_size=32, local_blocks=2, vert_stride=2, return_lse=True,
                       q_block_ids=ids, k_block_ids=ids)  # fmt: skip
    (o.sum() + lse.sum()).backward()


def _nsa():
    q, k, v = _qkv(h=4, h_kv=1)
    k_cmp, v_cmp = (x[:, :7].detach().requires_grad_() for x in (k, v))
    o, lse = K.nsa_cmp_attn(q, k_cmp, v_cmp, cmp_block=32, cmp_stride=16, return_lse=True, q_offset=64)
    (o.sum() + lse.sum()).backward()
    idx = K.nsa_select_blocks(q.detach(), k_cmp.detach(), lse.detach(), 32, 16, 32, 4, q_offset=64)
    o = K.nsa_select_attn(q, k, v, idx, block_size=32, q_offset=64, k_offset=64)
    o.sum().backward()


def _gla():
    q, k, v = _qkv(h=2, h_kv=2)
    g = torch.nn.functional.logsigmoid(torch.randn(1, 128, 2)).requires_grad_()
    h0 = torch.zeros(1, 2, 32, 32, requires_grad=True)
    o, state = K.gated_linear_attn(q, k, v, g, initial_state=h0, output_final_state=True)
    (o.sum() + state.sum()).backward()


def _delta():
    """Packed documents (cu_seqlens at a CP offset) and an initial state."""
    q, k, v = _qkv(h=2, h_kv=2)
    g = torch.nn.functional.logsigmoid(torch.randn(1, 128, 2)).requires_grad_()
    beta = torch.rand(1, 128, 2, requires_grad=True)
    h0 = torch.zeros(1, 2, 32, 32, requires_grad=True)
    cu = torch.tensor([[0, 150, 200, 256]], dtype=torch.int32)
    o, state = K.gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu, offset=128
    )
    (o.sum() + state.sum()).backward()


@pytest.mark.parametrize(
    "op", [_flash, _s2, _nsa, _gla, _delta], ids=["flash", "s2", "nsa", "gla", "gated_delta"]
)
def test_no_host_sync_on_the_steady_state_path(op, monkeypatch):
    with no_kernels(monkeypatch):
        op()  # the first call with a shape may build and cache plans
        with SyncRecorder() as recorder:
            op()
    assert not recorder.bad, "host synchronisation on the second call:\n" + "\n".join(recorder.bad)


def test_sync_recorder_catches_what_it_must():
    """The check can fail: each forbidden pattern is seen."""
    x = torch.arange(6.0)
    with SyncRecorder() as recorder:
        x.sum().item()
        x[x > 2]
        torch.bincount(torch.tensor([1, 2]))
        x.repeat_interleave(torch.tensor([1, 2, 1, 1, 1, 1]))
        torch.unique(x)
        x.nonzero()
    reasons = "\n".join(recorder.bad)
    for word in ("host", "boolean-mask", "bincount", "repeat_interleave", "unique", "nonzero"):
        assert word in reasons, (word, reasons)


# ----------------------------------------------------------------------------------------------------------
# Offsets past 2^31

B, T, T_LINEAR, H, D = 1, 2**20, 2**22, 32, 128
fa = s2 = gla = common = None  # the kernel modules, imported by `probes` with the interpreter on


@pytest.fixture(scope="module")
def probes():
    """Probe kernels calling each family's offset helpers, built with the interpreter on (numpy
    int32 arithmetic wraps, as the GPU's does)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TRITON_INTERPRET", "1")
    try:
        import triton
        import triton.language as tl

        # Module globals: the interpreter resolves names in a kernel's globals, not its closure.
        global fa, s2, gla, common
        fa = importlib.import_module("longctx.kernels.flash_attn.triton")
        s2 = importlib.import_module("longctx.kernels.s2_attn.triton")
        gla = importlib.import_module("longctx.kernels.gla.chunk")
        common = importlib.import_module("longctx.kernels.common.triton")

        @triton.jit
        def flash(out, start, stride_t, BR: tl.constexpr, BD: tl.constexpr):
            zero = tl.full([], 0, tl.int64)
            p = fa._rows_ptr(zero, start, stride_t, BR, BD)
            tl.store(out + tl.arange(0, BR)[:, None] * BD + tl.arange(0, BD)[None, :], p)

        @triton.jit
        def s2_rows(out, i_b, i_h, stride_b, stride_h, start, stride_t, BR: tl.constexpr, BD: tl.constexpr):
            zero = tl.full([], 0, tl.int64)
            p = s2._row_ptrs(s2._base(zero, i_b, i_h, stride_b, stride_h), start, stride_t, BR, BD)
            tl.store(out + tl.arange(0, BR)[:, None] * BD + tl.arange(0, BD)[None, :], p)

        @triton.jit
        def gla_tile(out, r0, c0, R, C, stride_r, stride_c, BR: tl.constexpr, BC: tl.constexpr):
            zero = tl.full([], 0, tl.int64)
            p, m = gla.strided_tile(zero, r0, c0, R, C, stride_r, stride_c, BR, BC)
            tl.store(out + tl.arange(0, BR)[:, None] * BC + tl.arange(0, BC)[None, :], p)

        @triton.jit
        def nsa_rows(out, i_b, T, t0, i_h, H: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                     BR: tl.constexpr):  # fmt: skip
            o_r = tl.arange(0, BR)
            tl.store(out + o_r, common.row_offset(i_b, T, t0 + o_r // G, H, i_h, G, o_r % G, D))

    finally:
        patch.undo()  # the probes stay interpreted; the flag must not leak to other modules (conftest)
    return dict(flash=flash, s2=s2_rows, gla=gla_tile, nsa=nsa_rows)


@pytest.fixture
def probe(probes, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # launching an interpreted kernel needs it too
    return probes


def _grid_out(rows, cols):
    return torch.zeros(rows, cols, dtype=torch.int64)


def test_flash_row_offsets_fit_at_1m_tokens(probe):
    # [B, T, H, D] contiguous: the token stride is H * D; the last tile starts 64 rows before T.
    out = _grid_out(64, D)
    probe["flash"][(1,)](out, T - 64, H * D, BR=64, BD=D)
    expect = (torch.arange(T - 64, T)[:, None] * (H * D) + torch.arange(D)[None, :]).long()
    assert torch.equal(out, expect) and int(out.max()) >= 2**31


def test_s2_head_and_row_offsets_fit_at_1m_tokens(probe):
    # Head-major q ([B, H, T, D] viewed as [B, T, H, D]): head stride T * D, the last head's last rows.
    out = _grid_out(64, D)
    probe["s2"][(1,)](out, 0, H - 1, H * T * D, T * D, T - 64, D, BR=64, BD=D)
    expect = (H - 1) * T * D + torch.arange(T - 64, T)[:, None] * D + torch.arange(D)[None, :]
    assert torch.equal(out, expect.long()) and int(out.max()) >= 2**31


def test_gla_tile_offsets_fit_at_4m_tokens(probe):
    # The k^T tile: rows are head dims (stride 1), columns tokens (stride H * K), the last chunk.
    out = _grid_out(64, 64)
    probe["gla"][(1,)](out, 64, T_LINEAR - 64, D, T_LINEAR, 1, H * D, BR=64, BC=64)
    rows, cols = torch.arange(64, 128)[:, None], torch.arange(T_LINEAR - 64, T_LINEAR)[None, :]
    assert torch.equal(out, (rows + cols * (H * D)).long()) and int(out.max()) >= 2**33
    # The v tile of the last chunk and head: rows tokens, columns the value dims.
    out = _grid_out(64, 64)
    probe["gla"][(1,)](out, T_LINEAR - 64, 64, T_LINEAR, D, H * D, 1, BR=64, BC=64)
    rows, cols = torch.arange(T_LINEAR - 64, T_LINEAR)[:, None], torch.arange(64, 128)[None, :]
    assert torch.equal(out, (rows * (H * D) + cols).long())


def test_nsa_row_offsets_fit_at_1m_tokens(probe):
    # The last tile's rows: 4 tokens x a group of 8 query heads of the last kv group (32 heads, 4 kv).
    out = torch.zeros(32, dtype=torch.int64)
    probe["nsa"][(1,)](out, 0, T, T - 4, 3, H=H, G=8, D=D, BR=32)
    r = torch.arange(32)
    expect = ((T - 4 + r // 8) * H + 3 * 8 + r % 8) * D
    assert torch.equal(out, expect.long()) and int(out.max()) >= 2**31
