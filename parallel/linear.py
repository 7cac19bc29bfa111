"""Context-parallel gated linear attention (L layers): pass states, not keys and values.

The sequence is `2P` chunks in zigzag order; rank `r` holds chunks `r` and `2P-1-r`. Each rank runs
the chunked kernel on its chunks from a zero state, getting per chunk `c` the output `o_c^0`, the
final state `S_c` and the total log-decay `a_c = sum_{t in c} g_t`. Chunk `c` maps the state entering
it affinely, `X -> exp(a_c) X + S_c`, and two such maps compose into one,

    (a_1, S_1) then (a_2, S_2)  =  (a_1 + a_2, exp(a_2) S_1 + S_2),

so the state entering chunk `c`, `H_c` (`H_0 = 0`), is an exclusive scan of the chunk maps in
chunk order. Because the recurrence is linear in its state, the true output is the zero-state
output plus the decayed contribution of `H_c`:

    o_t = o_t^0 + scale * exp(b_t) q_t H_c,    b_t = sum of g from the chunk's first token to t.

The scan (`zigzag_state_scan`) is Hillis-Steele over the `2P` chunk positions with point-to-point
messages: in round `k` the position `i` sends its map of chunks `(i - 2^k, i]` to position `i + 2^k`
and composes what position `i - 2^k` sent; a second accumulator with an empty start collects the
exclusive prefix. `ceil(log2(2P))` rounds; each rank sends at most two maps `[B, H, Dk * Dv + 1]` a
round (one per chunk it holds, never two to one peer), so a rank's memory and bytes per round do not
grow with `P`. Any `P` works, power of two or not. Every exponent is a sum of log-decays (<= 0), in
fp32 (fp64 for fp64 inputs) with autocast off, combined in a fixed order: deterministic.

Backward, written as the reverse scan: with `G_j = dL/dS_j`,

    G_j = dH_{j+1} + exp(a_{j+1}) G_{j+1}   (G_{2P-1} = 0),    dL/da_j = exp(a_j) <G_j, H_j>,

the same exclusive scan over the maps `(a_c, dH_c)` in reverse chunk order. Reversed, rank `r` still
holds positions `r` and `2P-1-r`, so the backward sends what the forward sent, to the same peers.
The kernel then carries `G_c` from `S_c` into that chunk's q, k, v, g.

Documents. A document start inside chunk `c` resets the state (the kernel gives that token the decay
exp(-1e4) = 0, `reset_at_documents`). The same reset enters `a_c` and `b_t`, so `exp(a_c)` and the
carry `exp(b_t)` of every token from the start on are exactly 0: a chunk after a boundary ignores the
prefix state, with no extra communication.
"""

import torch
import torch.distributed as dist
from torch import nn

from longctx.kernels import gated_linear_attn
from longctx.kernels.gla import reset_at_documents
from longctx.parallel.comm import send_recv
from longctx.parallel.dense import check_zigzag


def zigzag_chunk_ids(rank: int, size: int) -> tuple[int, int]:
    return rank, 2 * size - 1 - rank


def zigzag_owner(chunk: int, size: int) -> int:
    """The rank holding global chunk `chunk` of `2 * size`."""
    return chunk if chunk < size else 2 * size - 1 - chunk


def scan_rounds(rank: int, size: int) -> list[tuple[list[tuple[int, int]], list[tuple[int, int]]]]:
    """The Hillis-Steele rounds of rank `rank`: per round, `(sends, receives)`, each a list of
    `(slot, peer)` where `slot` 0/1 is the rank's chunk `rank` / `2 size - 1 - rank` and `peer` a
    group rank; `peer == rank` is a hand-over between the rank's own two chunks. The same in reverse
    chunk order (slots swap, the set of positions does not)."""
    n = 2 * size
    positions = zigzag_chunk_ids(rank, size)
    rounds, step = [], 1
    while step < n:
        sends = [(s, zigzag_owner(p + step, size)) for s, p in enumerate(positions) if p + step < n]
        recvs = [(s, zigzag_owner(p - step, size)) for s, p in enumerate(positions) if p - step >= 0]
        rounds.append((sends, recvs))
        step *= 2
    return rounds


def _compose(first: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
    """Maps packed as `[..., K + 1]` (state flattened, then the log-decay): `first` then `then`."""
    decay = then[..., -1:]
    return torch.cat([torch.exp(decay) * first[..., :-1] + then[..., :-1], first[..., -1:] + decay], dim=-1)


def _exclusive_scan(maps: torch.Tensor, reverse: bool, group, rank: int, size: int) -> torch.Tensor:
    """`maps` `[2, B, H, K + 1]` this rank's two chunk maps (slot order); returns `[2, B, H, K]` the
    state entering each: the composition of every earlier chunk's map (later ones when `reverse`)
    applied to zero. No autograd (`ZigzagStateScan` holds the backward)."""
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(size))
    slots = (1, 0) if reverse else (0, 1)  # slots[i]: the slot at the rank's i-th position
    # x: the map of chunks (pos - 2^k, pos]; e: of chunks (pos - 2^k, pos), identity (zeros) to start.
    x = [maps[s].contiguous() for s in slots]
    e = [torch.zeros_like(x[0]), torch.zeros_like(x[1])]
    for sends, recvs in scan_rounds(rank, size):
        incoming = {}
        p2p_recvs = []
        for i, peer in recvs:
            if peer == rank:
                # The rank's other position (an earlier chunk of its own): its map as of this round.
                incoming[i] = x[1 - i]
            else:
                incoming[i] = torch.empty_like(x[i])
                p2p_recvs.append((incoming[i], ranks[peer]))
        p2p_sends = [(x[i], ranks[peer]) for i, peer in sends if peer != rank]
        for req in send_recv(p2p_sends, p2p_recvs, group):
            req.wait()
        # Out of place: the tensors just sent or handed over keep this round's values.
        for i, prev in incoming.items():
            e[i] = _compose(prev, e[i])
            x[i] = _compose(prev, x[i])
    by_slot = [None, None]
    for i, s in enumerate(slots):
        by_slot[s] = e[i][..., :-1]
    return torch.stack(by_slot)


class ZigzagStateScan(torch.autograd.Function):
    """The states entering this rank's two zigzag chunks, from every chunk's (log-decay, final state).

    Forward: `decays` `[2, B, H]`, `states` `[2, B, H, Dk, Dv]` (this rank's chunks `r`, `2P-1-r`, fp32
    or fp64) -> `[2, B, H, Dk, Dv]`. Backward: the reverse scan (module docstring).
    """

    @staticmethod
    def forward(ctx, decays, states, group, rank, size):
        shape = states.shape
        maps = torch.cat([states.flatten(3), decays[..., None]], dim=-1)  # [2, B, H, Dk * Dv + 1]
        entering = _exclusive_scan(maps, False, group, rank, size).view(shape)
        ctx.save_for_backward(decays, entering)
        ctx.group, ctx.rank, ctx.size = group, rank, size
        return entering

    @staticmethod
    def backward(ctx, d_entering):
        decays, entering = ctx.saved_tensors
        d_entering = d_entering.to(entering.dtype)
        maps = torch.cat([d_entering.flatten(3), decays[..., None]], dim=-1)
        d_states = _exclusive_scan(maps, True, ctx.group, ctx.rank, ctx.size).view(entering.shape)
        d_decays = torch.exp(decays) * (d_states * entering).sum(dim=(-2, -1))
        return d_decays, d_states, None, None, None


class DecayedCarry(torch.autograd.Function):
    """`scale * exp(cum_t) q_t H` per token: what the state `H` entering a chunk adds to its outputs.

    Forward: `q` `[B, n, H, Dk]` (any float dtype), `cum` `[B, n, H]` log-decay from the chunk's first
    token, `state` `[B, H, Dk, Dv]` (fp32 or fp64; the math runs in its dtype) -> `[B, n, H, Dv]`.
    Saves only its inputs: autograd through the einsum would keep the decayed queries, a second copy
    of `q` in fp32.
    """

    @staticmethod
    def forward(ctx, q, cum, state, scale):
        ctx.save_for_backward(q, cum, state)
        ctx.scale = scale
        decayed = q.to(state.dtype) * torch.exp(cum)[..., None]
        return scale * torch.einsum("bthk,bhkv->bthv", decayed, state)

    @staticmethod
    def backward(ctx, d_out):
        q, cum, state = ctx.saved_tensors
        q_dtype, q = q.dtype, q.to(state.dtype)
        decay = torch.exp(cum)[..., None]  # [B, n, H, 1]
        d_out = d_out.to(state.dtype)
        # The gradient of the decayed queries q_t exp(cum_t), then through the product.
        d_decayed = ctx.scale * torch.einsum("bthv,bhkv->bthk", d_out, state)
        d_state = ctx.scale * torch.einsum("bthk,bthv->bhkv", q * decay, d_out)
        d_cum = (d_decayed * q).sum(dim=-1) * decay[..., 0]
        return (d_decayed * decay).to(q_dtype), d_cum, d_state, None


def zigzag_state_scan(decays: torch.Tensor, states: torch.Tensor, group) -> torch.Tensor:
    """Differentiable `ZigzagStateScan` over `group` (None: the default group).

    Args:
        decays: `[2, B, H]` total log-decay (<= 0) of this rank's chunks `r` and `2P-1-r`.
        states: `[2, B, H, Dk, Dv]` their final states from a zero start (fp32, or fp64).
    Returns:
        `[2, B, H, Dk, Dv]`: `H_c` for both chunks, `H_c = sum_{c' < c} exp(a_{c'+1} + ... + a_{c-1}) S_{c'}`.
    """
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    return ZigzagStateScan.apply(decays, states, group, rank, size)


class StatePassingLinearCore(nn.Module):
    letter = "L"

    def __init__(self, group, deterministic: bool = False):
        super().__init__()
        # The scan is deterministic whatever `deterministic` says: a fixed composition order, no sums
        # left to a collective.
        self.group, self.deterministic = group, deterministic

    def forward(self, q, k, v, g, layout):
        check_zigzag(layout, self.group)
        dk = q.shape[-1]
        # States are fp32 (fp64 when the inputs are): the carry must not lose what the kernel kept.
        work = torch.promote_types(q.dtype, torch.float32)
        cu_seqlens = None if layout.docs is None else layout.docs.on(q.device)
        outs, states, segments, decays = [], [], [], []
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
            states.append(state.to(work))
        scale = dk**-0.5
        result = []
        # The scan and the carry are fp32 math whatever autocast says: bf16 would round the states.
        with torch.autocast(q.device.type, enabled=False):
            totals = torch.stack([g_seg.to(work).sum(dim=1) for g_seg in decays])  # [2, B, H]
            entering = zigzag_state_scan(totals, torch.stack(states), self.group)  # [2, B, H, Dk, Dv]
            for slot, (o, seg, g_seg) in enumerate(zip(outs, segments, decays)):
                cum = torch.cumsum(g_seg.to(work), dim=1)  # [B, n, H]
                carry = DecayedCarry.apply(q[:, seg], cum, entering[slot], scale)  # [B, n, H, Dv]
                result.append((o.to(work) + carry).to(o.dtype))
        return torch.cat(result, dim=1)
