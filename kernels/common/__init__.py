"""Pieces shared by the token-mixer ops: backend dispatch and small helpers."""

from longctx.kernels.common.backend import backend, get_backend, set_backend, use_triton

__all__ = ["backend", "get_backend", "set_backend", "use_triton"]
