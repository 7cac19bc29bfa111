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


def test_skipped_kernel_launches_save_the_same_bytes_as_interpreted_kernels(monkeypatch):
    """`--kernels skip` is only valid if what the wrappers keep does not depend on the kernels'
    values: one process, every mixer, the Triton kernels interpreted against no-op launches."""
    from triton.runtime.interpreter import InterpretedFunction

    from longctx.bench.memory import MIXERS, SHAPE, measure_one, skip_kernel_launches
    from longctx.config import load_config

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    runs = []
    run = InterpretedFunction.run
    counted = lambda self, *args, **kwargs: runs.append(1) or run(self, *args, **kwargs)  # noqa: E731
    monkeypatch.setattr(InterpretedFunction, "run", counted)
    cfg = load_config(None, [*SHAPE, "model.dim=32", "model.n_heads=2", "model.n_kv_heads=1"]).model
    one_core_each = [(letter, scheme) for letter, scheme in MIXERS if scheme not in ("ulysses", "usp")]
    for letter, scheme in one_core_each:  # D's ring, Ulysses and USP are one core in one process
        runs.clear()
        saved, peak = measure_one(letter, scheme, cfg, 0, 1, 64)
        # The check can fail: the interpreted kernels ran, the skipped ones do not.
        assert runs, letter
        runs.clear()
        with skip_kernel_launches():
            saved_skip, peak_skip = measure_one(letter, scheme, cfg, 0, 1, 64)
        assert not runs, letter
        assert saved_skip == saved, letter
        # The interpreter's own copies of kernel arguments can add to the peak, never remove from it.
        assert 0.95 * peak <= peak_skip <= peak, (letter, peak, peak_skip)
