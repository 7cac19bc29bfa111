import math

import pytest
import torch

from longctx.config import RopeConfig, RopeScalingConfig, load_config
from longctx.model import MIXERS, build_model
from longctx.model.rope import apply_rope, rope_cos_sin, rope_inv_freq

SMALL = [
    "model.vocab_size=64",
    "model.dim=32",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.n_layers=2",
    "model.s2.block_size=8",
    "model.s2.local_blocks=1",
    "model.s2.vert_stride=2",
    "model.nsa.cmp_block=8",
    "model.nsa.cmp_stride=4",
    "model.nsa.slc_block=8",
    "model.nsa.slc_top=3",
    "model.nsa.window=16",
    "data.seq_len=64",
]


def small_model(letter: str, *extra):
    cfg = load_config(None, SMALL + [f"model.layers={letter}", *extra])
    return build_model(cfg.model), cfg


def test_registry_has_every_letter():
    assert sorted(MIXERS) == ["D", "G", "L", "N", "S"]


@pytest.mark.parametrize("letter", ["D", "S", "N", "L", "G", "DSNLG"])
def test_model_forward_backward(letter):
    model, cfg = small_model(letter)
    tokens = torch.randint(0, 64, (2, 50))
    logits = model(tokens)
    assert logits.shape == (2, 50, 64) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"


@pytest.mark.parametrize("letter", ["D", "S", "N", "L", "G"])
def test_model_is_causal(letter):
    """Changing token t leaves every logit before t unchanged."""
    model, _ = small_model(letter)
    tokens = torch.randint(0, 64, (1, 60))
    changed = tokens.clone()
    changed[0, 41] = (changed[0, 41] + 1) % 64
    a, b = model(tokens), model(changed)
    assert torch.allclose(a[:, :41], b[:, :41], atol=1e-6)
    assert not torch.allclose(a[:, 41:], b[:, 41:], atol=1e-6)


def test_pattern_tiles_and_builds_in_that_order():
    model, cfg = small_model("LLLS", "model.n_layers=8")
    assert "".join(layer.letter for layer in model.layers) == "LLLSLLLS"
    assert [type(layer.mixer).letter for layer in model.layers] == list("LLLSLLLS")


def test_build_is_seeded_and_ties_embeddings():
    torch.manual_seed(3)
    a, _ = small_model("D")
    torch.manual_seed(3)
    b, _ = small_model("D")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    tied, _ = small_model("D", "model.tie_embeddings=true")
    assert tied.output.weight is tied.tok_embeddings.weight


def test_activation_checkpointing_gives_same_gradients():
    model, _ = small_model("DSNL")
    tokens = torch.randint(0, 64, (2, 48))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.activation_checkpointing = flag
        model(tokens).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(*grads))


def rope(kind="none", factor=1.0, theta=10000.0, original=64):
    return RopeConfig(
        theta=theta, scaling=RopeScalingConfig(type=kind, factor=factor, original_max_len=original)
    )


def test_rope_depends_only_on_relative_position():
    inv, _ = rope_inv_freq(16, rope())
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def dot(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([pq]), inv)
        ck, sk = rope_cos_sin(torch.tensor([pk]), inv)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    assert torch.allclose(dot(10, 3), dot(107, 100), atol=1e-4)
    assert not torch.allclose(dot(10, 3), dot(10, 4), atol=1e-4)


def test_rope_scalings_follow_their_formulas():
    d = 16
    base = 10000.0 ** -(torch.arange(0, d, 2, dtype=torch.float64) / d)
    inv, m = rope_inv_freq(d, rope())
    assert torch.allclose(inv.double(), base, rtol=1e-6) and m == 1.0
    inv, m = rope_inv_freq(d, rope("linear", 4.0))
    assert torch.allclose(inv.double(), base / 4, rtol=1e-6) and m == 1.0
    inv, _ = rope_inv_freq(d, rope("ntk", 4.0))
    ntk_base = 10000.0 * 4.0 ** (d / (d - 2))
    assert torch.allclose(
        inv.double(), ntk_base ** -(torch.arange(0, d, 2, dtype=torch.float64) / d), rtol=1e-6
    )
    inv, m = rope_inv_freq(d, rope("yarn", 8.0, original=64))
    assert m == pytest.approx(0.1 * math.log(8.0) + 1)
    # Highest frequency is kept (extrapolation), lowest interpolated by the factor.
    assert inv[0] == pytest.approx(float(base[0]), rel=1e-6)
    assert inv[-1] == pytest.approx(float(base[-1]) / 8, rel=1e-6)
    assert torch.all(inv.double() <= base * (1 + 1e-6)) and torch.all(inv.double() >= base / 8 * (1 - 1e-6))


def test_llama3_scaling_keeps_short_wavelengths_and_interpolates_long_ones():
    d, original, factor = 64, 256, 8.0
    base = 10000.0 ** -(torch.arange(0, d, 2, dtype=torch.float64) / d)
    inv, m = rope_inv_freq(d, rope("llama3", factor, original=original))
    assert m == 1.0
    for b, got in zip(base.tolist(), inv.double().tolist()):
        wavelength = 2 * math.pi / b
        if wavelength < original / 4:  # high_freq_factor 4: kept
            assert got == pytest.approx(b, rel=1e-6)
        elif wavelength > original / 1:  # low_freq_factor 1: interpolated
            assert got == pytest.approx(b / factor, rel=1e-6)
        else:  # blended linearly in original / wavelength
            w = (original / wavelength - 1) / (4 - 1)
            assert got == pytest.approx((1 - w) * b / factor + w * b, rel=1e-6)
    assert (inv.double() < base * (1 - 1e-3)).any() and (inv.double() > base / factor * 1.001).any()


def test_yarn_scales_logits_by_mscale_squared():
    inv, m = rope_inv_freq(8, rope("yarn", 4.0))
    cos, sin = rope_cos_sin(torch.tensor([0]), inv, m)
    x = torch.randn(1, 1, 1, 8)
    y = apply_rope(x, cos, sin)
    assert torch.allclose((y * y).sum(), m * m * (x * x).sum(), rtol=1e-5)
