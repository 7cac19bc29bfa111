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
    "longctx.kernels.nsa.select_attn": [
        "_select_fwd_kernel", "_select_bwd_dq_kernel", "_select_bwd_dkdv_kernel",
    ],
    "longctx.kernels.nsa.cmp_attn": ["_cmp_fwd_kernel", "_cmp_bwd_dq_kernel", "_cmp_bwd_dkdv_kernel"],
    "longctx.kernels.nsa.select_blocks": ["_select_blocks_kernel"],
    "longctx.kernels.nsa.common": ["_softmax_delta_kernel"],
    "longctx.kernels.gla.chunk": [
        "chunk_local_cumsum_kernel", "chunk_fwd_h_kernel", "chunk_fwd_o_kernel", "chunk_bwd_dh_kernel",
        "chunk_bwd_dv_kernel", "chunk_bwd_dqk_kernel",
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


@pytest.mark.parametrize("op", [_flash, _s2, _nsa, _gla], ids=["flash", "s2", "nsa", "gla"])
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
