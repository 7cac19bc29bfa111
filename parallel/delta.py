"""Context-parallel gated delta rule (G layers): pass affine state maps, not keys and values.

The sequence is `2P` chunks in zigzag order; rank `r` holds chunks `r` and `2P-1-r`. A chunk maps the
state entering it to the state leaving it affinely,

    S_end = A_c S_start + B_c,   A_c = prod_t exp(g_t) (I - beta_t k_t k_t^T)  (Dk x Dk),  B_c (Dk x Dv)

(the delta rule's transition depends on the keys, so unlike the L layer's scalar decay `A_c` is a
matrix). Per layer:

1. Halo: the width-4 convolution needs the 3 pre-convolution inputs before each chunk. Every rank
   all-gathers the last 3 tokens of its two chunks (q, k, v channels together) and takes those of
   the chunk before each of its own (the first chunk gets zeros, as in one process).
2. Maps: each rank runs the chunked op once per chunk on `[v | 0]` from the initial state `[0 | I]`:
   the final state is `[B_c | A_c]` (the op is linear in its state, column by column). One all-gather
   shares every chunk's `(A_c, B_c)` in fp32 (fp64 for fp64 inputs).
3. Prefix: every rank composes `H_0 = 0`, `H_{c+1} = A_c H_c + B_c` (2P small matmuls) and reruns its
   chunks from their entering states `H_c` for the outputs (chunk 0 reuses its pass-2 output).

The backward is autograd through the same steps: the all-gathers' backward reduce-scatters the
gradients of the gathered maps and halos back to their owners, and the op carries them into its
inputs and its initial state. Bytes sent per rank and layer, forward, with `C` the q/k/v channels:
`(P - 1) x 2 x B x H x Dk x (Dk + Dv) x 4` for the maps plus `(P - 1) x 2 x 3 x B x C x` the
activation size for the halos, independent of the sequence length; the backward sends the same.
Compute: each chunk runs the op twice (maps, then outputs), the first pass on `Dv + Dk` columns.

Documents (a layout with `docs`): both passes run the op with `cu_seqlens` at the chunk's global offset,
so a document start inside chunk `c` drops the state entering it there: the map's `[B_c | A_c]` then
ignores everything before that start (`A_c`'s factor `exp(g_start)` is exactly 0), with no extra
communication. The convolution reads the halo only for tokens whose document began before the chunk
(global positions, `since_document_start`).
"""

import torch
from torch import nn

from longctx.kernels import gated_delta_rule
from longctx.model.mixers.delta import since_document_start
from longctx.parallel.comm import all_gather
from longctx.parallel.dense import check_zigzag


def zigzag_chunk_ids(rank: int, size: int) -> tuple[int, int]:
    return rank, 2 * size - 1 - rank


def entering_states(maps: torch.Tensor, dv: int) -> torch.Tensor:
    """States entering each chunk, in global chunk order.

    Args:
        maps: `[C, B, H, Dk, Dv + Dk]`, chunk c's `[B_c | A_c]`.
    Returns:
        `[C, B, H, Dk, Dv]`: `H_0 = 0`, `H_{c+1} = A_c H_c + B_c`.
    """
    entering = [torch.zeros_like(maps[0, ..., :dv])]
    for c in range(maps.shape[0] - 1):
        entering.append(maps[c, ..., dv:] @ entering[-1] + maps[c, ..., :dv])
    return torch.stack(entering)


class StatePassingDeltaCore(nn.Module):
    letter = "G"

    def __init__(self, core, group):
        super().__init__()
        # The single-process core: its `prepare` (convolution, norms, head sharing) is reused as is.
        self.local = core
        self.group = group

    def prepare(self, qkv, conv_weight, halo):
        """The local core's convolution, norms and head sharing (decoding steps use it)."""
        return self.local.prepare(qkv, conv_weight, halo)

    def forward(self, qkv, g, beta, conv_weight, layout):
        rank, size = check_zigzag(layout, self.group)
        halo = conv_weight.shape[-1] - 1
        n = layout.segments[0][1]
        if n < halo:
            raise ValueError(
                f"G layers under context parallelism need chunks of at least {halo} tokens (the "
                f"convolution halo); got {n} (seq_len {layout.seq_len}, cp {size}): use a longer "
                "data.seq_len or a smaller parallel.cp"
            )
        segments = [slice(0, n), slice(n, 2 * n)]
        chunk_ids = zigzag_chunk_ids(rank, size)
        tails = all_gather(torch.stack([qkv[:, seg][:, n - halo :] for seg in segments]), self.group)
        tail_of = {c: tails[p, slot] for p in range(size) for slot, c in enumerate(zigzag_chunk_ids(p, size))}
        work = torch.promote_types(qkv.dtype, torch.float32)
        cu_seqlens = None if layout.docs is None else layout.docs.on(qkv.device)
        prepared, maps, first_outputs = [], [], []
        for seg, c in zip(segments, chunk_ids):
            since_start = since_document_start(layout, c * n, n, qkv.device)
            halo_in = tail_of[c - 1] if c > 0 else None
            q, k, v = self.local.prepare(qkv[:, seg], conv_weight, halo_in, since_start)
            b, _, h, dk = q.shape
            dv = v.shape[-1]
            v_aug = torch.cat([v, v.new_zeros(b, n, h, dk)], dim=-1)
            eye = torch.eye(dk, dtype=work, device=q.device).expand(b, h, dk, dk)
            start = torch.cat([eye.new_zeros(b, h, dk, dv), eye], dim=-1)
            o_aug, ab = gated_delta_rule(
                q, k, v_aug, g[:, seg], beta[:, seg], initial_state=start, output_final_state=True,
                cu_seqlens=cu_seqlens, offset=c * n,
            )  # fmt: skip
            prepared.append((q, k, v))
            maps.append(ab.to(work))
            first_outputs.append(o_aug[..., :dv])
        # One all-gather of both chunks' [B_c | A_c]: [P, 2, B, H, Dk, Dv + Dk].
        gathered = all_gather(torch.stack(maps), self.group)
        by_chunk = [None] * (2 * size)
        for p in range(size):
            for slot, c in enumerate(zigzag_chunk_ids(p, size)):
                by_chunk[c] = gathered[p, slot]
        entering = entering_states(torch.stack(by_chunk), dv)
        outs = []
        for (q, k, v), seg, c, o_first in zip(prepared, segments, chunk_ids, first_outputs):
            if c == 0:
                outs.append(o_first)
                continue
            o, _ = gated_delta_rule(
                q, k, v, g[:, seg], beta[:, seg], initial_state=entering[c],
                cu_seqlens=cu_seqlens, offset=c * n,
            )  # fmt: skip
            outs.append(o)
        return torch.cat(outs, dim=1)
