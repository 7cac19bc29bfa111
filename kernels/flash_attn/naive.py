"""Reference dense softmax attention in plain PyTorch: the math every dense kernel is tested against.

Positions are global: query row `i` sits at `q_offset + i`, key column `j` at `k_offset + j`, so the
same function computes a whole sequence or one (query chunk, key chunk) pair of a context-parallel
ring. Computes in fp32 (fp64 when given fp64) and returns the input dtype; `lse` is fp32/fp64.
Holds one `[B, H, Tq, Tk]` score tensor at a time. `attention_bwd_ref` is the explicit backward
(FlashAttention-2's formulas, no autograd), which ring attention's CPU path runs per chunk pair.
"""

import torch


def expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Repeat kv heads so query head `h` reads kv head `h // (H // H_kv)` (GQA)."""
    n_kv = x.shape[2]
    if n_heads % n_kv != 0:
        raise ValueError(f"query heads ({n_heads}) must be a multiple of kv heads ({n_kv})")
    return x if n_kv == n_heads else x.repeat_interleave(n_heads // n_kv, dim=2)


def position_mask(
    t_q: int, t_k: int, q_offset: int, k_offset: int, causal: bool, window: int | None, device
) -> torch.Tensor | None:
    """Allowed (query, key) pairs `[Tq, Tk]` from causality and a left window, or None if all."""
    if not causal and window is None:
        return None
    q_pos = torch.arange(t_q, device=device)[:, None] + q_offset
    k_pos = torch.arange(t_k, device=device)[None, :] + k_offset
    allowed = torch.ones(t_q, t_k, dtype=torch.bool, device=device)
    if causal:
        allowed &= k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    return_lse: bool = False,
    q_offset: int = 0,
    k_offset: int = 0,
    mask: torch.Tensor | None = None,
):
    """Softmax attention with causal / window / extra masks.

    Args:
        q: `[B, Tq, H, D]`.
        k, v: `[B, Tk, H_kv, D]` with `H % H_kv == 0`.
        causal: key `j` visible to query `i` only if its position is not after the query's.
        window: if set, keys more than `window - 1` positions before the query are hidden.
        q_offset, k_offset: global position of the first query / key.
        mask: optional bool tensor broadcastable to `[B, H, Tq, Tk]`, True where allowed.
    Returns:
        `o` `[B, Tq, H, D]`, and `lse` `[B, H, Tq]` if `return_lse`. Rows with no visible key give
        `o = 0`, `lse = -inf`, so they drop out of an lse merge.
    """
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    out_dtype = q.dtype
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_heads = q.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qf = q.to(work).transpose(1, 2)  # [B, H, Tq, D]
    kf = expand_kv(k.to(work), n_heads).transpose(1, 2)
    vf = expand_kv(v.to(work), n_heads).transpose(1, 2)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    allowed = position_mask(q.shape[1], k.shape[1], q_offset, k_offset, causal, window, q.device)
    if mask is not None:
        allowed = mask if allowed is None else allowed & mask
    empty = None
    if allowed is not None:
        allowed = allowed.expand(scores.shape[-2:]) if allowed.dim() == 2 else allowed
        empty = ~allowed.any(dim=-1, keepdim=True)  # rows that see no key at all
        # Empty rows get uniform scores (finite gradients) and are zeroed after the softmax.
        scores = scores.masked_fill(~(allowed | empty), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if empty is not None and bool(empty.any()):
        probs = probs.masked_fill(empty, 0.0)
    o = torch.matmul(probs, vf).transpose(1, 2).to(out_dtype)
    if not return_lse:
        return o
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Tq]
    if empty is not None:
        lse = lse.masked_fill(empty.squeeze(-1), float("-inf"))
    return o, lse


def merge_partials_ref(outs: list[torch.Tensor], lses: list[torch.Tensor]):
    """Merge attention results over disjoint key sets: `o = sum_c exp(lse_c - lse) o_c`.

    Args:
        outs: `[B, T, H, D]` partial outputs; lses: `[B, H, T]` their log-sum-exps.
    Returns:
        `(o, lse)` with `lse = logsumexp_c(lse_c)`, merged in fp32 (fp64 for fp64 inputs).
    """
    work = torch.float64 if lses[0].dtype == torch.float64 else torch.float32
    stacked = torch.stack([x.to(work) for x in lses])  # [C, B, H, T]
    lse = torch.logsumexp(stacked, dim=0)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    o = sum(
        torch.exp(l_c - safe).transpose(1, 2)[..., None] * o_c.to(work) for o_c, l_c in zip(outs, stacked)
    )
    return o.to(outs[0].dtype), lse


def attention_bwd_ref(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    q_offset: int = 0,
    k_offset: int = 0,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    dlse: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
):
    """Gradients of `attention_ref` from the FlashAttention-2 formulas, without autograd.

    `o` and `lse` may belong to a larger key set than `k`, `v` (the merged output and log-sum-exp of a
    whole row, as ring attention passes them): then `P = exp(S - lse)` is this chunk's share of the row's
    softmax and the result is this chunk's part of the gradient.

        P = exp(S - lse),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dQ = scale dS K,
        dK = scale dS^T Q,  delta = rowsum(dO * O) - dlse

    Args:
        do: `[B, Tq, H, D]` gradient of the output.
        q: `[B, Tq, H, D]`; k, v: `[B, Tk, H_kv, D]`; o: `[B, Tq, H, D]`; lse: `[B, H, Tq]`.
        q_offset, k_offset, causal, scale, window: as `attention_ref`.
        dlse: optional `[B, H, Tq]` gradient of `lse`.
        mask: optional bool tensor broadcastable to `[B, H, Tq, Tk]`, True where allowed.
    Returns:
        `(dq, dk, dv)` in the dtypes and shapes of `q`, `k`, `v` (dk, dv summed over each kv group).
    """
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, t_q, n_heads, d = q.shape
    t_k, n_kv = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    qf = q.to(work).transpose(1, 2)  # [B, H, Tq, D]
    kf = expand_kv(k.to(work), n_heads).transpose(1, 2)  # [B, H, Tk, D]
    vf = expand_kv(v.to(work), n_heads).transpose(1, 2)
    dof = do.to(work).transpose(1, 2)
    lse = lse.to(work)[..., None]  # [B, H, Tq, 1]
    # Rows that see no key (lse = -inf) have P = 0; keep exp() away from +inf.
    empty = torch.isneginf(lse)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    probs = torch.exp(scores - lse.masked_fill(empty, 0.0)).masked_fill(empty, 0.0)
    allowed = position_mask(t_q, t_k, q_offset, k_offset, causal, window, q.device)
    if mask is not None:
        allowed = mask if allowed is None else allowed & mask
    if allowed is not None:
        probs = probs.masked_fill(~allowed, 0.0)
    delta = (dof * o.to(work).transpose(1, 2)).sum(-1, keepdim=True)  # [B, H, Tq, 1]
    if dlse is not None:
        delta = delta - dlse.to(work)[..., None]
    dp = torch.matmul(dof, vf.transpose(-1, -2))
    ds = probs * (dp - delta)
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale  # [B, H, Tk, D]
    dv = torch.matmul(probs.transpose(-1, -2), dof)

    def to_kv_heads(x):
        return x.view(b, n_kv, n_heads // n_kv, t_k, d).sum(2).transpose(1, 2)

    return dq.transpose(1, 2).to(q.dtype), to_kv_heads(dk).to(k.dtype), to_kv_heads(dv).to(v.dtype)
