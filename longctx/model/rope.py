"""Rotary position embeddings with the context-extension scalings of DESIGN.md.

`none`: plain RoPE. `linear`: position interpolation (positions / factor). `ntk`: base
`theta * factor ** (d / (d - 2))`. `yarn`: per-frequency ramp between interpolation (low
frequencies) and extrapolation (high frequencies), the ramp set by how many turns each frequency
makes over `original_max_len` (`beta_fast`, `beta_slow`), and queries and keys each scaled by
`0.1 * ln(factor) + 1` (so logits by its square, as in the YaRN paper and Hugging Face's models).
`llama3`: Llama 3.1's rule: frequencies whose wavelength exceeds `original_max_len / low_freq_factor`
are divided by `factor`, those under `original_max_len / high_freq_factor` kept, and the band between
blends the two linearly in `original_max_len / wavelength`.

Rotation is the rotate-half convention of Llama checkpoints, so imported weights need no permutation.
"""

import math

import torch

from longctx.config import RopeConfig


def rope_inv_freq(head_dim: int, cfg: RopeConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies `[head_dim / 2]` (fp32) and the q/k magnitude scale."""
    scaling = cfg.scaling
    kind, factor = scaling.type, scaling.factor
    theta = cfg.theta
    if kind == "ntk":
        theta = theta * factor ** (head_dim / (head_dim - 2))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = theta**-exponents
    mscale = 1.0
    if kind == "linear":
        inv_freq = inv_freq / factor
    elif kind == "yarn":
        inv_freq, mscale = _yarn(inv_freq, head_dim, theta, factor, scaling)
    elif kind == "llama3":
        inv_freq = _llama3(inv_freq, factor, scaling)
    return inv_freq.float(), mscale


def _yarn(inv_freq, head_dim, theta, factor, scaling):
    def dim_for_turns(turns: float) -> float:
        # The rotary dimension whose frequency turns `turns` times over the original context.
        return head_dim * math.log(scaling.original_max_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dim_for_turns(scaling.beta_fast)), 0)
    high = min(math.ceil(dim_for_turns(scaling.beta_slow)), head_dim - 1)
    if high <= low:
        high = low + 1e-3
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    # ramp 0: high frequency, kept (extrapolation); ramp 1: low frequency, interpolated.
    scaled = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return scaled, mscale


def _llama3(inv_freq, factor, scaling):
    # Turns each frequency makes over the original context; few turns: interpolate, many: keep.
    turns = scaling.original_max_len * inv_freq / (2 * math.pi)
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    blend = ((turns - low) / (high - low)).clamp(0, 1)
    return inv_freq / factor * (1 - blend) + inv_freq * blend


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, mscale: float = 1.0):
    """`cos`, `sin` `[T, head_dim]` fp32 for `positions` `[T]` (or `[B, T, head_dim]` for per-sequence
    positions `[B, T]`, e.g. counted from each document's start)."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * mscale, angles.sin() * mscale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[B, T, H, D]` by the angles of its positions (cos/sin `[T, D]` or `[B, T, D]`)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
