"""The two meters of `longctx bench memory`, on tensors whose sizes are known."""

import torch

from longctx.bench.memory import LiveBytes, _saved_bytes


class _Saves(torch.autograd.Function):
    """Saves its input, a new tensor, and the input again (a storage saved twice counts once)."""

    @staticmethod
    def forward(ctx, x):
        extra = torch.ones(300, dtype=torch.float64)
        ctx.save_for_backward(x, extra, x[:10])
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


def test_saved_bytes_see_a_functions_save_for_backward_once_per_storage():
    x = torch.randn(100, requires_grad=True)
    hooks, seen = _saved_bytes()
    with hooks:
        _Saves.apply(x)
    assert sum(seen.values()) == 100 * 4 + 300 * 8
    with hooks:
        torch.exp(x)  # saves its [100] fp32 output
    assert sum(seen.values()) == 100 * 4 + 300 * 8 + 100 * 4


def test_live_bytes_peak_follows_frees():
    mode = LiveBytes()
    with mode:
        a = torch.zeros(1000)
        b = torch.zeros(2000)
        del a
        c = torch.zeros(500)
    assert mode.peak == (1000 + 2000) * 4
    assert mode.now == (2000 + 500) * 4
    del b, c
