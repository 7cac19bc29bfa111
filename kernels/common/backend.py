"""Choose between the Triton kernels and the plain PyTorch references.

`auto` (the default) runs Triton on CUDA tensors, or anywhere when `TRITON_INTERPRET=1` is set (the
Triton interpreter, how the CPU test suite runs the kernels), and the reference otherwise. Tests force
a backend with `LONGCTX_KERNEL_BACKEND=naive|triton` or the context manager:

    with longctx.kernels.backend("naive"):
        out = flash_attn(q, k, v)
"""

import contextlib
import functools
import importlib.util
import os

import torch

_BACKENDS = ("auto", "triton", "naive")
_override: str | None = None


def _check(name: str) -> str:
    if name not in _BACKENDS:
        raise ValueError(f"kernel backend must be one of {_BACKENDS}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Force a backend for every op (`None` returns to the environment / `auto`)."""
    global _override
    _override = None if name is None else _check(name)


def get_backend() -> str:
    if _override is not None:
        return _override
    return _check(os.environ.get("LONGCTX_KERNEL_BACKEND", "auto"))


@contextlib.contextmanager
def backend(name: str):
    """Run the enclosed ops on backend `name` ('auto', 'triton' or 'naive')."""
    global _override
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        _override = previous


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the op should launch its Triton kernel for these inputs."""
    choice = get_backend()
    if choice == "naive":
        return False
    runnable = triton_available() and (interpreting() or all(t.is_cuda for t in tensors))
    if choice == "triton" and not runnable:
        raise RuntimeError(
            "the Triton backend was forced but cannot run here: it needs CUDA tensors, or "
            "TRITON_INTERPRET=1 for the CPU interpreter, and the `triton` package installed"
        )
    return runnable
