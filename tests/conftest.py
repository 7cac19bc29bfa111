"""Shared test helpers. Kernel tests compare against fp64 brute force written independently here."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")


def _share_cores_between_workers() -> None:
    """Under pytest-xdist each worker gets its share of the cores, not all of them: two workers with
    two threads each on a 2-core machine would spend their time preempting each other."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


_share_cores_between_workers()


def _import_triton_for_interpreter() -> None:
    """Without CUDA, import Triton once with `TRITON_INTERPRET=1`, then put the flag back.

    `@triton.jit` reads the flag when a function is decorated, Triton's own helpers (`tl.zeros`,
    reductions) included, so the session's first `import triton` decides whether kernels can ever be
    interpreted. The flag itself stays off: the kernel test modules turn it on for their own tests
    only (every other test trains on the PyTorch reference, which the flag would replace with the far
    slower interpreter). Kernel modules are imported on first use, so they follow the flag of the test
    that first needs them."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except ImportError:
        pass
    finally:
        del os.environ["TRITON_INTERPRET"]


_import_triton_for_interpreter()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm of the difference over norm of the reference (`b`). Infinite entries (lse of rows that
    see no key) must match exactly; they are then left out of the norms."""
    a, b = a.double(), b.double()
    inf = torch.isinf(b)
    if not torch.equal(torch.isinf(a), inf) or not torch.equal(a[inf], b[inf]):
        return float("inf")
    a, b = a[~inf], b[~inf]
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _kernel_backend_reset():
    """The kernel backend is process-global (`set_backend`, which a Trainer built with
    `train.kernels=flex` calls): put it back after every test, so a test's result never depends on
    which tests ran before it in the same process (as they do under pytest-xdist's workers)."""
    from longctx.kernels.common import set_backend

    yield
    set_backend(None)


@pytest.fixture(scope="module")
def triton_kernels():
    """The kernel test modules' one switch (`pytestmark = pytest.mark.usefixtures("triton_kernels")`):
    the Triton kernels run compiled on a GPU and under the interpreter without one, for that module's
    tests only. Kernel modules are imported on first use, so they are built for the interpreter when
    a test of such a module first needs them; the old setting comes back afterwards, so later modules
    train on the reference."""
    if torch.cuda.is_available():
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        yield


@pytest.fixture
def nan_buffers():
    """Uninitialised memory is poisoned while a test runs: every `torch.empty*` buffer (kernel outputs
    and workspaces) starts as NaN, integers as their largest value (torch's deterministic mode with
    `fill_uninitialized_memory`), so an element a kernel fails to write fails the comparison."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.isnan(torch.empty(4, device="cuda" if torch.cuda.is_available() else "cpu")).all()
    yield
    torch.utils.deterministic.fill_uninitialized_memory = fill
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


_USER_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_KERNEL_MODULES = {
    "test_flash_attn",
    "test_s2_attn",
    "test_nsa",
    "test_gla",
    "test_gated_delta",
    "test_doc_kernels",
}


@pytest.fixture(autouse=True)
def _interpreter_stays_in_kernel_modules(request):
    """Fail loudly if the interpreter flag leaks out of the kernel test modules: a model test would
    then run every kernel in the interpreter, minutes per step, until the suite timed out."""
    module = request.module.__name__.rsplit(".", 1)[-1]
    if not _USER_INTERPRET and module not in _KERNEL_MODULES:
        assert os.environ.get("TRITON_INTERPRET") != "1", (
            "TRITON_INTERPRET=1 leaked out of a kernel test module; use the triton_kernels fixture"
        )
    yield
