"""Shared test helpers. Kernel tests compare against fp64 brute force written independently here."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")


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
