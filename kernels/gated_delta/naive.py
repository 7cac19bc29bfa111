"""Reference gated delta rule in plain PyTorch: the token-by-token recurrence, its one-token decoding
step, and the chunked (WY / UT-transform) form the CPU path uses.

Per head a state `S` (`Dk x Dv`), `q, k` L2-normalised by the caller, `g_t <= 0`, `beta_t` in (0, 1):

    S_t = exp(g_t) S_{t-1};  u_t = beta_t (v_t - S_t^T k_t);  S_t = S_t + k_t u_t^T;  o_t = scale S_t^T q_t

The recurrence is written independently of the chunked form, so a test can hold one against the other.
"""

import torch

from longctx.kernels.common.linear import initial_state_or_zeros, work_dtype


def gated_delta_step_ref(q_t, k_t, v_t, g_t, beta_t, state, scale=None):
    """One token: q_t, k_t `[B, H, Dk]`, v_t `[B, H, Dv]`, g_t, beta_t `[B, H]`, state `[B, H, Dk, Dv]`.

    Returns `(o_t [B, H, Dv], new_state)`, both in the state's dtype.
    """
    work = state.dtype
    scale = q_t.shape[-1] ** -0.5 if scale is None else scale
    k_t, v_t = k_t.to(work), v_t.to(work)
    state = torch.exp(g_t.to(work))[..., None, None] * state
    u_t = beta_t.to(work)[..., None] * (v_t - torch.einsum("bhkv,bhk->bhv", state, k_t))
    state = state + torch.einsum("bhk,bhv->bhkv", k_t, u_t)
    return scale * torch.einsum("bhkv,bhk->bhv", state, q_t.to(work)), state


def gated_delta_recurrent_ref(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """One token at a time. q, k `[B, T, H, Dk]`, v `[B, T, H, Dv]`, g, beta `[B, T, H]`.

    Returns `(o [B, T, H, Dv] in v's dtype, final_state [B, H, Dk, Dv] or None)`.
    """
    work = work_dtype(q)
    state = initial_state_or_zeros(q, v, initial_state, work)
    outs = []
    for t in range(q.shape[1]):
        o_t, state = gated_delta_step_ref(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state, scale)
        outs.append(o_t)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape, dtype=work)
    return o.to(v.dtype), (state if output_final_state else None)


def gated_delta_chunk_ref(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, chunk_size: int = 64
):
    """Chunked gated delta rule: the UT transform inside a chunk, a state pass across chunks.

    Inside a chunk entered with state `H`, with `b_t` the log-decay summed from the chunk's first
    token, `S_t = exp(b_t) H + sum_{s <= t} exp(b_t - b_s) k_s u_s^T`, so the `u` solve the unit
    lower-triangular system `(I + A) U = diag(beta) V - diag(beta exp(b)) K H`,
    `A[t, s] = beta_t exp(b_t - b_s) k_t . k_s` for `s < t`. With `T = (I + A)^-1`,
    `U = U0 - W H` (`U0 = T diag(beta) V`, `W = T diag(beta exp(b)) K`), and

        O      = scale (diag(exp b) Q H + (Q K^T * D) U),   D[t, s] = exp(b_t - b_s), s <= t
        H_next = exp(b_last) H + (K * exp(b_last - b))^T U

    Every exponent is `<= 0`. Same arguments and results as `gated_delta_recurrent_ref`;
    differentiable by autograd (the CPU path).
    """
    work = work_dtype(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bsz, t_total, h, dk = q.shape
    dv = v.shape[-1]
    state = initial_state_or_zeros(q, v, initial_state, work)
    c = chunk_size
    n = -(-t_total // c)
    pad = n * c - t_total

    def chunks(x, dtype=work):
        # Padding tokens have k = v = q = 0, g = 0, beta = 0: they leave the state unchanged.
        x = x.to(dtype)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        x = x.transpose(1, 2)  # [B, H, T, ...]
        return x.reshape(bsz, h, n, c, *x.shape[3:])

    qc, kc, vc = chunks(q), chunks(k), chunks(v)  # [B, H, N, C, D]
    betac = chunks(beta[..., None])[..., 0]  # [B, H, N, C]
    # Prefix sums in fp64 (after a strong decay they reach the -1000s), rounded once differences form.
    b64 = torch.cumsum(chunks(g[..., None], torch.float64)[..., 0], dim=-1)
    idx = torch.arange(c, device=q.device)
    incl = idx[:, None] >= idx[None, :]
    decay = torch.exp((b64[..., :, None] - b64[..., None, :]).masked_fill(~incl, float("-inf"))).to(work)
    b = b64.to(work)
    b_last = b64[..., -1:]
    to_end = torch.exp(b_last - b64).to(work)  # [B, H, N, C]
    eye = torch.eye(c, dtype=work, device=q.device)
    a = (betac[..., None] * (kc @ kc.transpose(-1, -2)) * decay).tril(-1)
    rhs = torch.cat([betac[..., None] * vc, (betac * torch.exp(b))[..., None] * kc], dim=-1)
    sol = torch.linalg.solve_triangular(eye + a, rhs, upper=False, unitriangular=True)
    u0, w = sol[..., :dv], sol[..., dv:]
    qk = (qc @ kc.transpose(-1, -2)) * decay
    qdec = torch.exp(b)[..., None] * qc
    kdec = to_end[..., None] * kc
    chunk_decay = torch.exp(b_last[..., 0]).to(work)  # [B, H, N]
    outs = []
    for i in range(n):
        u = u0[:, :, i] - w[:, :, i] @ state
        outs.append(scale * (qdec[:, :, i] @ state + qk[:, :, i] @ u))
        state = chunk_decay[:, :, i, None, None] * state + kdec[:, :, i].transpose(-1, -2) @ u
    o = torch.stack(outs, dim=2).reshape(bsz, h, n * c, dv)[:, :, :t_total].transpose(1, 2)
    return o.to(v.dtype), (state if output_final_state else None)
