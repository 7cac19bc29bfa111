"""Context-parallel native sparse attention (N layers).

Per layer, on the zigzag shard of rank `r` (chunks `r` and `2P-1-r`, each `n` tokens):

1. compression: a compressed token stands for the window `[i*s, i*s + l)` (`s = cmp_stride`,
   `l = cmp_block`) and belongs to the chunk holding the window's last token. A chunk's windows
   reach `l - s` tokens into the chunk before it, so every chunk's last `l - s` keys/values are
   all-gathered (the halo); each rank compresses its own chunks (the learned MLP runs where the
   tokens are) and the compressed tokens, `T / s` in all, are all-gathered (their gradients are
   reduce-scattered in fp32).
2. selection: local queries attend every compressed token at their global positions and choose
   their blocks among all selection blocks of the sequence (`nsa_select_blocks` with `q_offset`).
3. selected and sliding-window attention, peer by peer (`parallel.blocks.PeerRounds`): at step `s`
   rank `r` holds rank `r - s`'s key/value shard and runs, for each pair of its query chunks and that
   shard's chunks, the selected attention over the listed blocks that fall in the key chunk and the
   window attention where the window reaches it; partials merge by lse in fp32. The selection is data
   dependent, so no rank can know without a device-to-host read which blocks a peer will ask for: every
   step moves a whole shard, a size fixed in advance (no host sync, memory ~1/P: the queries' own
   block lists and two shards at a time, never a sequence-long buffer). The backward fetches again and
   returns each shard's dK/dV in fp32 to its owner, added in step order (deterministic).

Communication per layer: the halos and the compressed tokens (`(P - 1) / P` of `T / s` tokens), and
`(P - 1) / P` of K, V (a dense ring's volume; the compute stays sparse); the backward moves K, V again
plus their fp32 gradients.

Documents (`layout.docs`, global boundaries known to every rank): every branch gets `cu_seqlens` and
masks to each query's document; chunk pairs whose key chunk ends before the query chunk's first
document are skipped on the host, and the window halo starts no earlier than that document.
"""

import torch
from torch import nn

from longctx.kernels import nsa_cmp_attn, nsa_select_blocks
from longctx.kernels.flash_attn import flash_attn_chunk_bwd, flash_attn_chunk_fwd
from longctx.kernels.nsa import nsa_select_attn_chunk_bwd, nsa_select_attn_chunk_fwd
from longctx.parallel.blocks import PeerRounds, WholeShards
from longctx.parallel.comm import all_gather
from longctx.parallel.dense import check_zigzag


def _segments(layout):
    start = 0
    for begin, n in layout.segments:
        yield slice(start, start + n), begin, n
        start += n


class ContextParallelNSACore(nn.Module):
    letter = "N"

    def __init__(self, cfg, group):
        super().__init__()
        self.cfg, self.group = cfg, group

    def compress(self, k, v, compress_k, compress_v, layout, rank, size):
        """The whole sequence's compressed keys and values `[B, Tc, H_kv, D]`, from local chunks."""
        c = self.cfg
        halo = c.cmp_block - c.cmp_stride
        kv = torch.cat([k, v], dim=2)  # [B, T_local, 2 * H_kv, D]
        n = layout.segments[0][1]
        tails = all_gather(torch.stack([kv[:, i * n + n - halo : (i + 1) * n] for i in range(2)]), self.group)
        tail_of = {}
        for p in range(size):
            for slot, chunk in enumerate((p, 2 * size - 1 - p)):
                tail_of[chunk] = tails[p, slot]
        compressed = []
        for rows, begin, _ in _segments(layout):
            chunk = begin // n
            # The first chunk has nothing before it: a zero halo whose windows are dropped below.
            before = tail_of[chunk - 1] if chunk > 0 else torch.zeros_like(tail_of[0])
            ext = torch.cat([before, kv[:, rows]], dim=1)
            k_ext, v_ext = ext.chunk(2, dim=2)
            compressed.append(torch.cat([compress_k(k_ext), compress_v(v_ext)], dim=2))
        gathered = all_gather(torch.stack(compressed), self.group)  # [P, 2, B, n / s, 2 * H_kv, D]
        by_chunk = [None] * (2 * size)
        for p in range(size):
            for slot, chunk in enumerate((p, 2 * size - 1 - p)):
                by_chunk[chunk] = gathered[p, slot]
        full = torch.cat(by_chunk, dim=1)[:, halo // c.cmp_stride :]
        # Contiguous once here, not once per kernel call (each would save its own copy).
        return tuple(x.contiguous() for x in full.chunk(2, dim=2))

    def forward(self, q, k, v, gates, compress_k, compress_v, layout):
        from longctx.model.mixers.nsa import mix_branches

        rank, size = check_zigzag(layout, self.group)
        c = self.cfg
        k_cmp, v_cmp = self.compress(k, v, compress_k, compress_v, layout, rank, size)
        docs = layout.docs
        cu = None if docs is None else docs.on(q.device)

        o_cmp, block_idx = [], []
        for rows, begin, _ in _segments(layout):
            o, lse = nsa_cmp_attn(
                q[:, rows], k_cmp, v_cmp, c.cmp_block, c.cmp_stride, return_lse=True, q_offset=begin,
                cu_seqlens=cu,
            )  # fmt: skip
            o_cmp.append(o)
            block_idx.append(
                nsa_select_blocks(
                    q[:, rows].detach(),
                    k_cmp.detach(),
                    lse.detach(),
                    c.cmp_block,
                    c.cmp_stride,
                    c.slc_block,
                    c.slc_top,
                    q_offset=begin,
                    cu_seqlens=cu,
                )  # fmt: skip
            )
        kv = torch.cat([k, v], dim=-1)  # [B, T_local, H_kv, 2D]: one message per step
        steps = _NSASteps(self, layout, rank, size, k.shape[-1], cu)
        shards = WholeShards(rank, size, self.group)
        o_slc, o_win = PeerRounds.apply(q, kv, torch.cat(block_idx, dim=1), shards, steps)
        return mix_branches(gates, torch.cat(o_cmp, dim=1), o_slc, o_win)

    def window_start(self, begin: int, docs) -> int:
        """The first key any query of the chunk at `begin` sees through its window."""
        first = max(0, begin - self.cfg.window + 1)
        return first if docs is None else max(first, docs.first_visible(begin, 1))


class _NSASteps:
    """Selected and window attention of one step for `PeerRounds`: slot `2 * branch + query chunk`
    (branch 0 selected, 1 window)."""

    def __init__(self, core, layout, rank, size, d, cu_seqlens):
        self.core, self.cfg, self.docs = core, core.cfg, layout.docs
        self.rank, self.size, self.d, self.cu = rank, size, d, cu_seqlens
        self.n = layout.segments[0][1]

    def _chunks(self, owner):
        return owner, 2 * self.size - 1 - owner

    def _pairs(self, step):
        """(query slot, query rows, key cols, q offset, k offset, selected?, window?) worth computing."""
        n, src = self.n, (self.rank - step) % self.size
        for qi, q_id in enumerate(self._chunks(self.rank)):
            q_off = q_id * n
            for ki, k_id in enumerate(self._chunks(src)):
                k_off = k_id * n
                if k_id > q_id:
                    continue
                if self.docs is not None and k_off + n <= self.docs.first_visible(q_off, n):
                    continue
                window = k_off + n > self.core.window_start(q_off, self.docs)
                yield qi, slice(qi * n, (qi + 1) * n), slice(ki * n, (ki + 1) * n), q_off, k_off, window

    def forward(self, step, q, kv, idx):
        c, d = self.cfg, self.d
        out = []
        for qi, rows, cols, q_off, k_off, window in self._pairs(step):
            k_c, v_c = kv[:, cols, :, :d], kv[:, cols, :, d:]
            out.append((qi, nsa_select_attn_chunk_fwd(q[:, rows], k_c, v_c, idx[:, rows], c.slc_block, q_off,
                                                      k_off, self.cu)))  # fmt: skip
            if window:
                out.append((2 + qi, flash_attn_chunk_fwd(q[:, rows], k_c, v_c, q_off, k_off, window=c.window,
                                                         cu_seqlens=self.cu)))  # fmt: skip
        return out

    def assemble(self, outs):
        return torch.cat([outs[0], outs[1]], dim=1), torch.cat([outs[2], outs[3]], dim=1)

    def split(self, grads):
        n = self.n
        return {2 * b + qi: g[:, qi * n : (qi + 1) * n] for b, g in enumerate(grads) for qi in range(2)}

    def backward(self, step, q, kv, idx, do, o, lse):
        c, d = self.cfg, self.d
        work = torch.promote_types(q.dtype, torch.float32)
        dq = torch.zeros_like(q, dtype=work)
        dkv = torch.zeros_like(kv, dtype=work)
        for qi, rows, cols, q_off, k_off, window in self._pairs(step):
            k_c, v_c = kv[:, cols, :, :d], kv[:, cols, :, d:]
            grads = [nsa_select_attn_chunk_bwd(do[qi], q[:, rows], k_c, v_c, o[qi].to(q.dtype), lse[qi],
                                               idx[:, rows], c.slc_block, q_off, k_off, self.cu)]  # fmt: skip
            if window:
                s = 2 + qi
                o_s = o[s].to(q.dtype)
                grads.append(flash_attn_chunk_bwd(do[s], q[:, rows], k_c, v_c, o_s, lse[s], q_off, k_off,
                                                  window=c.window, cu_seqlens=self.cu))  # fmt: skip
            for dq_p, dk_p, dv_p in grads:
                dq[:, rows] += dq_p
                dkv[:, cols, :, :d] += dk_p
                dkv[:, cols, :, d:] += dv_p
        return dq, dkv
