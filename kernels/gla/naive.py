"""Reference gated linear attention in plain PyTorch: the step recurrence and its chunked form.

Per head a state `S_t` (`Dk x Dv`): `S_t = exp(g_t) * S_{t-1} + k_t^T v_t`, `o_t = scale * q_t S_t`,
with `g_t <= 0` a scalar log-decay per head and token. The chunked form never builds
`exp(-cumsum(g))`: every decay it forms is `exp(b_t - b_s)` with `t >= s`, at most 1.
"""

import torch

from longctx.kernels.common.linear import initial_state_or_zeros, work_dtype


def gla_recurrent_ref(q, k, v, g, scale=None, initial_state=None, output_final_state=False):
    """One token at a time. q, k `[B, T, H, Dk]`, v `[B, T, H, Dv]`, g `[B, T, H]`.

    Returns `(o [B, T, H, Dv], final_state [B, H, Dk, Dv] or None)`.
    """
    work = work_dtype(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    state = initial_state_or_zeros(q, v, initial_state, work)
    outs = []
    for t in range(q.shape[1]):
        state = torch.exp(g[:, t].to(work))[..., None, None] * state + torch.einsum(
            "bhk,bhv->bhkv", k[:, t].to(work), v[:, t].to(work)
        )
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t].to(work), state))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape, dtype=work)
    return o.to(v.dtype), (state if output_final_state else None)


def gla_step_ref(q_t, k_t, v_t, g_t, state, scale=None):
    """One decoding step: q_t, k_t `[B, H, Dk]`, v_t `[B, H, Dv]`, g_t `[B, H]`, state fp32.

    Returns `(o_t [B, H, Dv], new_state)`.
    """
    scale = q_t.shape[-1] ** -0.5 if scale is None else scale
    state = torch.exp(g_t.to(state.dtype))[..., None, None] * state + torch.einsum(
        "bhk,bhv->bhkv", k_t.to(state.dtype), v_t.to(state.dtype)
    )
    return scale * torch.einsum("bhk,bhkv->bhv", q_t.to(state.dtype), state), state


def gla_chunk_ref(
    q, k, v, g, scale=None, initial_state=None, output_final_state=False, chunk_size: int = 64,
    exact_decay: bool = False,
):  # fmt: skip
    """Chunked gated linear attention: quadratic with a decay mask inside a chunk, recurrent across.

    Same arguments and results as `gla_recurrent_ref`. `exact_decay`: sum the log-decays in fp64
    before differencing (as the Triton kernel does), needed when `g` holds document resets of -1e4,
    where fp32 sums would lose 1e-3 of every later decay.
    """
    work = work_dtype(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    state = initial_state_or_zeros(q, v, initial_state, work)
    sum_dtype = torch.float64 if exact_decay else work
    t_total = q.shape[1]
    outs = []
    for start in range(0, t_total, chunk_size):
        end = min(start + chunk_size, t_total)
        qc, kc, vc = (x[:, start:end].to(work).transpose(1, 2) for x in (q, k, v))  # [B, H, C, D]
        b = torch.cumsum(g[:, start:end].to(sum_dtype), dim=1).transpose(1, 2)  # [B, H, C]
        c = end - start
        causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        # exp(b_t - b_s) for s <= t only; masked entries become exp(-inf) = 0.
        diff = (b[..., :, None] - b[..., None, :]).to(work)
        decay = torch.exp(diff.masked_fill(~causal, float("-inf")))
        attn = torch.matmul(qc, kc.transpose(-1, -2)) * decay
        o = torch.matmul(attn, vc) + torch.exp(b.to(work))[..., None] * torch.matmul(qc, state)
        outs.append((scale * o).transpose(1, 2))
        b_last = b[..., -1:]
        state = torch.exp(b_last.to(work))[..., None] * state + torch.matmul(
            (kc * torch.exp((b_last - b).to(work))[..., None]).transpose(-1, -2), vc
        )
    o = torch.cat(outs, dim=1) if outs else v.new_zeros(v.shape, dtype=work)
    return o.to(v.dtype), (state if output_final_state else None)
