"""Pieces shared by the linear-attention ops (`gla`, gated linear attention; `gated_delta`, Gated
DeltaNet): argument checks, and the references' working precision and initial state."""

import torch


def check_linear_args(q, k, v, initial_state, **gates) -> None:
    """`ValueError` unless q, k are `[B, T, H, Dk]`, v `[B, T, H, Dv]`, each gate (`g`, `beta`, ...)
    `[B, T, H]` and `initial_state` None or `[B, H, Dk, Dv]`."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, Dk]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must be [B, T, H, Dv] with q's B, T, H {tuple(q.shape[:3])}; got {tuple(v.shape)}"
        )
    for name, x in gates.items():
        if x.shape != q.shape[:3]:
            raise ValueError(f"{name} must be [B, T, H] = {tuple(q.shape[:3])}; got {tuple(x.shape)}")
    expected = (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    if initial_state is not None and tuple(initial_state.shape) != expected:
        raise ValueError(
            f"initial_state must be [B, H, Dk, Dv] = {expected}; got {tuple(initial_state.shape)}"
        )


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """The references compute in fp64 for fp64 inputs and in fp32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def initial_state_or_zeros(q, v, initial_state, work: torch.dtype) -> torch.Tensor:
    """`[B, H, Dk, Dv]` in `work`: the given state, or zeros."""
    b, _, h, dk = q.shape
    if initial_state is None:
        return q.new_zeros(b, h, dk, v.shape[-1], dtype=work)
    return initial_state.to(work)
