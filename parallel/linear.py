"""Context-parallel gated linear attention (L layers): pass states, not keys and values.

The sequence is `2P` chunks in zigzag order; rank `r` holds chunks `r` and `2P-1-r`. Each rank runs
the chunked kernel on its chunks from a zero state, getting per chunk `c` the output `o_c^0`, the
final state `S_c` and the total log-decay `a_c = sum_{t in c} g_t`. One all-gather shares every
chunk's `(S_c, a_c)`; then the state entering chunk `c` is

    H_c = sum_{c' < c} exp(a_{c'+1} + ... + a_{c-1}) S_{c'}        (H_0 = 0)

and, because the recurrence is linear in its state, the true output is the zero-state output plus
the decayed contribution of `H_c`:

    o_t = o_t^0 + scale * exp(b_t) q_t H_c,    b_t = sum of g from the chunk's first token to t.

Every exponent is a sum of log-decays (<= 0). A rank needs the states entering its two chunks only,
so it forms those two weighted sums from the gathered chunks (`entering_state`), no scan over all
`2P`, in fp32 with autocast off. The backward is autograd through the same steps: the
all-gather's backward reduce-scatters the gradients of the gathered states back to their owners, and
the kernel carries them from `S_c` into that chunk's q, k, v, g.

Documents. A document start inside chunk `c` resets the state (the kernel gives that token the decay
exp(-1e4) = 0, `reset_at_documents`). The same reset enters `a_c` and `b_t`, so `exp(a_c)` and the
carry `exp(b_t)` of every token from the start on are exactly 0: a chunk after a boundary ignores the
prefix state, with no extra communication. Communication per layer is
`P x 2 x B x H x Dk x Dv` floats forward (and the same backward), independent of the sequence length.
"""

import torch
from torch import nn

from longctx.kernels import gated_linear_attn
from longctx.kernels.gla import reset_at_documents
from longctx.parallel.comm import all_gather
from longctx.parallel.dense import check_zigzag


def zigzag_chunk_ids(rank: int, size: int) -> tuple[int, int]:
    return rank, 2 * size - 1 - rank


def entering_state(states: torch.Tensor, decays: torch.Tensor, chunk: int) -> torch.Tensor:
    """The state entering global chunk `chunk`, from every earlier chunk's (state, decay).

    Args:
        states: `[C, B, H, Dk, Dv]` each chunk's final state from a zero start (fp32 or fp64).
        decays: `[C, B, H]` each chunk's total log-decay (<= 0).
    Returns:
        `[B, H, Dk, Dv]`: `H_c = sum_{c' < c} exp(a_{c'+1} + ... + a_{c-1}) S_{c'}` (`H_0 = 0`).

    One weighted sum, not a scan: the exponents are suffix sums of log-decays (sums of numbers <= 0,
    so no cancellation of large partial sums), and a rank needs only its own two chunks' states.
    """
    if chunk == 0:
        return torch.zeros_like(states[0])
    # suffix[c'] = a_{c'+1} + ... + a_{chunk-1}, for c' < chunk.
    later = decays[1:chunk].flip(0).cumsum(0).flip(0)  # [chunk - 1, B, H]
    suffix = torch.cat([later, torch.zeros_like(decays[:1])])  # [chunk, B, H]
    return torch.einsum("cbh,cbhkv->bhkv", torch.exp(suffix), states[:chunk])


class StatePassingLinearCore(nn.Module):
    letter = "L"

    def __init__(self, group, deterministic: bool = False):
        super().__init__()
        self.group, self.deterministic = group, deterministic

    def forward(self, q, k, v, g, layout):
        rank, size = check_zigzag(layout, self.group)
        b, _, h, dk = q.shape
        dv = v.shape[-1]
        # States are fp32 (fp64 when the inputs are): the carry must not lose what the kernel kept.
        work = torch.promote_types(q.dtype, torch.float32)
        cu_seqlens = None if layout.docs is None else layout.docs.on(q.device)
        outs, packed, segments, decays = [], [], [], []
        start = 0
        for offset, n in layout.segments:
            seg = slice(start, start + n)
            start += n
            o, state = gated_linear_attn(
                q[:, seg], k[:, seg], v[:, seg], g[:, seg], output_final_state=True,
                cu_seqlens=cu_seqlens, offset=offset,
            )  # fmt: skip
            outs.append(o)
            segments.append(seg)
            g_seg = g[:, seg] if cu_seqlens is None else reset_at_documents(g[:, seg], cu_seqlens, offset)
            decays.append(g_seg)
            decay = g_seg.to(work).sum(dim=1)  # [B, H]
            packed.append(torch.cat([state.to(work).flatten(2), decay[..., None]], dim=-1))
        # One all-gather of both chunks' (state, decay): [P, 2, B, H, Dk * Dv + 1].
        gathered = all_gather(torch.stack(packed), self.group, deterministic=self.deterministic)
        by_chunk = [None] * (2 * size)
        for p in range(size):
            for slot, c in enumerate(zigzag_chunk_ids(p, size)):
                by_chunk[c] = gathered[p, slot]
        chunks = torch.stack(by_chunk)
        states, chunk_decays = chunks[..., :-1].view(2 * size, b, h, dk, dv), chunks[..., -1]
        scale = dk**-0.5
        result = []
        # The carry is fp32 math whatever autocast says: bf16 einsums would round the states.
        with torch.autocast(q.device.type, enabled=False):
            for slot, (o, seg, g_seg) in enumerate(zip(outs, segments, decays)):
                chunk = zigzag_chunk_ids(rank, size)[slot]
                h_in = entering_state(states, chunk_decays, chunk)  # [B, H, Dk, Dv]
                cum = torch.cumsum(g_seg.to(work), dim=1)  # [B, n, H]
                carry = torch.einsum("bthk,bhkv->bthv", q[:, seg].to(work) * torch.exp(cum)[..., None], h_in)
                result.append((o.to(work) + scale * carry).to(o.dtype))
        return torch.cat(result, dim=1)
