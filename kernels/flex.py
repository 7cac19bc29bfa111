"""The `flex` backend: D (dense) and S (S2) attention through PyTorch's FlexAttention.

It is the benchmark peer of the Triton kernels and their fallback (`train.kernels=auto` runs an op
here when `longctx check` failed for it on this GPU, see `longctx.kernels.common.backend`). The
masks are `mask_mod`s over global positions, turned into a `BlockMask` (FlexAttention skips the
blocks it marks empty), so the same code runs a whole sequence, a ring's (query chunk, key chunk)
pair at offsets, and an S2 shard with gathered key blocks.

    with longctx.kernels.backend("flex"):
        o, lse = flash_attn_chunk(q, k, v, q_offset=1024, k_offset=0)

Forward: `flex_attention(..., return_aux=AuxRequest(lse=True))`, whose lse is natural-log (checked
against the fp64 reference in the tests); rows that see no key give `o = 0`, `lse = -inf` as the
project's convention requires. Backward: FlexAttention has none on CPU, so there (and always for
the ring's per-pair backward given the merged `o` and `lse`) the FlashAttention-2 formulas run in
PyTorch over the mask evaluated to a dense `[H, Tq, Tk]` bool; on CUDA the whole-op backward
recomputes the forward under autograd through FlexAttention's own backward (untested on a GPU).
On CUDA `flex_attention` is compiled once per process; on CPU it runs eagerly.
"""

import functools
import warnings

import torch

from longctx.kernels.flash_attn.naive import expand_kv

_BLOCK = 128


def _flex():
    from torch.nn.attention import flex_attention as fa

    return fa


@functools.cache
def _compiled():
    return torch.compile(_flex().flex_attention, dynamic=False)


def _batched(mask_mod, doc_start: torch.Tensor):
    """Mark a mask as per sequence (document masking): its BlockMask and dense form take the batch."""
    mask_mod.batch = doc_start.shape[0]
    return mask_mod


def dense_mask(
    q_offset: int, k_offset: int, causal: bool, window: int | None, device=None, doc_start=None
):
    """`mask_mod(b, h, q_idx, kv_idx)` of causal / windowed attention at global offsets, or None.

    `doc_start` `[B, Tq]`: the global position of each query's document start (document masking; keys
    before it are hidden). The offsets are captured as tensors, so that a compiled FlexAttention does
    not specialize (and recompile) on each chunk pair's offsets.
    """
    if not causal and window is None and doc_start is None:
        return None
    q_offset = torch.tensor(q_offset, device=device)
    k_offset = torch.tensor(k_offset, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        q_pos, k_pos = q_idx + q_offset, kv_idx + k_offset
        allowed = (k_pos <= q_pos) if causal else (k_pos >= 0)
        if window is not None:
            allowed = allowed & (k_pos > q_pos - window)
        if doc_start is not None:
            allowed = allowed & (k_pos >= doc_start[b, q_idx])
        return allowed

    return mask_mod if doc_start is None else _batched(mask_mod, doc_start)


def s2_mask(n_heads, block_size, local_blocks, vert_stride, dense_heads, q_pos, k_pos, doc_start=None):
    """`mask_mod` of S2 (DESIGN.md, `s2_attn.naive`) for tokens at global positions `q_pos`, `k_pos`;
    `doc_start` `[B, Tq]` hides keys before each query's document start."""
    head_step = max(1, vert_stride // n_heads)

    def mask_mod(b, h, q_idx, kv_idx):
        qp, kp = q_pos[q_idx], k_pos[kv_idx]
        i, j = qp // block_size, kp // block_size
        pattern = ((i - j) < local_blocks) | ((j + 1 + h * head_step) % vert_stride == 0)
        pattern = pattern | (h >= n_heads - dense_heads)
        allowed = (kp <= qp) & pattern
        if doc_start is not None:
            allowed = allowed & (kp >= doc_start[b, q_idx])
        return allowed

    return mask_mod if doc_start is None else _batched(mask_mod, doc_start)


def _batch(mask_mod):
    """The BlockMask's batch size: None (one mask for every sequence) unless document-masked."""
    return getattr(mask_mod, "batch", None)


def _dense_bool(mask_mod, n_heads, t_q, t_k, device) -> torch.Tensor | None:
    """The mask evaluated on every (sequence, head, query, key): `[B or 1, H, Tq, Tk]` bool, or None
    (all allowed)."""
    if mask_mod is None:
        return None
    n_b = _batch(mask_mod) or 1
    b = torch.arange(n_b, device=device).view(-1, 1, 1, 1)
    h = torch.arange(n_heads, device=device).view(1, -1, 1, 1)
    i = torch.arange(t_q, device=device).view(1, 1, -1, 1)
    j = torch.arange(t_k, device=device).view(1, 1, 1, -1)
    return mask_mod(b, h, i, j).expand(n_b, n_heads, t_q, t_k)


def _forward(q, k, v, mask_mod, scale, per_head: bool):
    """`(o [B, Tq, H, D], lse [B, H, Tq] fp32/fp64)` of FlexAttention, no autograd."""
    fa = _flex()
    b, t_q, n_heads, _ = q.shape
    t_k = k.shape[1]
    block_mask = None
    if mask_mod is not None:
        block_mask = fa.create_block_mask(
            mask_mod, _batch(mask_mod), n_heads if per_head or _batch(mask_mod) else None, t_q, t_k,
            device=q.device, BLOCK_SIZE=_BLOCK,
        )  # fmt: skip
    run = _compiled() if q.is_cuda else fa.flex_attention
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        o, aux = run(
            *[x.detach().transpose(1, 2) for x in (q, k, v)], block_mask=block_mask, scale=scale,
            enable_gqa=k.shape[2] != n_heads, return_aux=fa.AuxRequest(lse=True),
        )  # fmt: skip
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return o.transpose(1, 2).contiguous(), aux.lse.to(lse_dtype)


def backward(do, q, k, v, o, lse, mask_mod, scale, dlse=None):
    """`(dq, dk, dv)` from the FlashAttention-2 formulas, given the (possibly merged) `o` and `lse`.

    `P = exp(S - lse)`, `dV = P^T dO`, `dS = P (dO V^T - rowsum(dO O) + dlse)`, `dQ = scale dS K`,
    `dK = scale dS^T Q`; kv-head gradients summed over each GQA group. Computes in fp32 (fp64 for fp64).
    """
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, t_q, n_heads, _ = q.shape
    n_kv, t_k = k.shape[2], k.shape[1]
    qf = q.to(work).transpose(1, 2)
    kf = expand_kv(k.to(work), n_heads).transpose(1, 2)
    vf = expand_kv(v.to(work), n_heads).transpose(1, 2)
    dof = do.to(work).transpose(1, 2)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    lse_w = lse.to(work)[..., None]
    p = torch.exp(scores - lse_w.masked_fill(torch.isneginf(lse_w), 0.0))
    allowed = _dense_bool(mask_mod, n_heads, t_q, t_k, q.device)
    keep = torch.isfinite(lse_w) if allowed is None else (allowed & torch.isfinite(lse_w))
    p = p * keep
    delta = (dof * o.to(work).transpose(1, 2)).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - dlse.to(work)[..., None]
    ds = p * (torch.matmul(dof, vf.transpose(-1, -2)) - delta)
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
    dv = torch.matmul(p.transpose(-1, -2), dof)
    group = n_heads // n_kv
    dk = dk.view(b, n_kv, group, t_k, -1).sum(2)
    dv = dv.view(b, n_kv, group, t_k, -1).sum(2)
    return (dq.transpose(1, 2).to(q.dtype), dk.transpose(1, 2).to(k.dtype), dv.transpose(1, 2).to(v.dtype))


class FlexFunction(torch.autograd.Function):
    """FlexAttention's `(o, lse)`, differentiable in both outputs (module docstring for the backward)."""

    @staticmethod
    def forward(ctx, q, k, v, mask_mod, scale, per_head):
        o, lse = _forward(q, k, v, mask_mod, scale, per_head)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (mask_mod, scale, per_head)
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        mask_mod, scale, per_head = ctx.args
        do = torch.zeros_like(o) if do is None else do
        if q.is_cuda:  # FlexAttention's own backward (no CPU backward exists)
            fa = _flex()
            with torch.enable_grad():
                xs = [x.detach().requires_grad_() for x in (q, k, v)]
                heads = q.shape[2] if per_head or _batch(mask_mod) else None
                bm = None if mask_mod is None else fa.create_block_mask(
                    mask_mod, _batch(mask_mod), heads, q.shape[1], k.shape[1], device=q.device
                )  # fmt: skip
                o2, aux = _compiled()(
                    *[x.transpose(1, 2) for x in xs], block_mask=bm, scale=scale,
                    enable_gqa=k.shape[2] != q.shape[2], return_aux=fa.AuxRequest(lse=True),
                )  # fmt: skip
                outs, cots = [o2.transpose(1, 2)], [do]
                if dlse is not None:
                    outs.append(aux.lse)
                    cots.append(dlse.to(aux.lse.dtype))
                dq, dk, dv = torch.autograd.grad(outs, xs, cots)
        else:
            dq, dk, dv = backward(do, q, k, v, o, lse, mask_mod, scale, dlse)
        return dq, dk, dv, None, None, None


def attention(q, k, v, mask_mod, scale, per_head=False):
    """Differentiable `(o, lse)` under `mask_mod` (None: every key visible)."""
    return FlexFunction.apply(q, k, v, mask_mod, scale, per_head)


def forward(q, k, v, mask_mod, scale, per_head=False):
    """`(o, lse)` without autograd."""
    return _forward(q, k, v, mask_mod, scale, per_head)
