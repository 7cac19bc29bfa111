"""Choose between the Triton kernels and the plain PyTorch references.

`auto` (the default) runs Triton on CUDA tensors, or anywhere when `TRITON_INTERPRET=1` is set (the
Triton interpreter, how the CPU test suite runs the kernels), and the reference otherwise. Tests force
a backend with `LONGCTX_KERNEL_BACKEND=naive|triton` or the context manager:

    with longctx.kernels.backend("naive"):
        out = flash_attn(q, k, v)

`flex` runs D and S (`flash` and `s2` ops) through PyTorch's FlexAttention (`longctx.kernels.flex`);
ops without a FlexAttention form (NSA, GLA, DeltaNet) run under it as under `auto`. Under `auto`,
an op that `longctx check` found failing on this GPU (its cache, `check_cache_path()`) falls back:
`flash` and `s2` to `flex`, the others to the reference, and a log line says so once per op.
"""

import contextlib
import functools
import importlib.util
import json
import logging
import os
import pathlib

import torch

_BACKENDS = ("auto", "triton", "naive", "flex")
FLEX_OPS = ("flash", "s2")
_override: str | None = None
_log = logging.getLogger("longctx.kernels")


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


def check_cache_path() -> pathlib.Path:
    """Where `longctx check` records which ops failed per device (`LONGCTX_CHECK_CACHE` overrides)."""
    default = pathlib.Path.home() / ".cache" / "longctx" / "check.json"
    return pathlib.Path(os.environ.get("LONGCTX_CHECK_CACHE", default))


def device_key(device) -> str:
    """The cache key of a device: the GPU's name, or `cpu-interpreter` for the Triton interpreter."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu-interpreter"


@functools.cache
def failed_ops(key: str) -> frozenset:
    """Ops `longctx check` last found failing on device `key` (empty when it never ran there)."""
    path = check_cache_path()
    if not path.exists():
        return frozenset()
    try:
        entry = json.loads(path.read_text()).get(key, {})
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot read the longctx check cache {path} ({e}); delete it or rerun longctx check"
        ) from e
    return frozenset(op for op, ok in entry.get("ops", {}).items() if not ok)


_announced: set = set()


def op_backend(op: str, *tensors: torch.Tensor) -> str:
    """Where op `op` ('flash', 's2', 'nsa', 'gla', 'delta') runs for these inputs: 'triton', 'flex' or
    'naive' (module docstring)."""
    choice = get_backend()
    if choice == "flex" and op in FLEX_OPS:
        return "flex"
    if not use_triton(*tensors):
        return "naive"
    if choice in ("auto", "flex") and op in failed_ops(device_key(tensors[0].device)):
        fallback = "flex" if op in FLEX_OPS else "naive"
        if op not in _announced:
            _announced.add(op)
            _log.warning(
                "kernels: longctx check failed for %s on this device (%s); running it on %s instead",
                op, check_cache_path(), fallback,
            )  # fmt: skip
        return fallback
    return "triton"


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
