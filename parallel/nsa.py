"""Context-parallel native sparse attention (N layers).

Per layer, on the zigzag shard of rank `r` (chunks `r` and `2P-1-r`, each `n` tokens):

1. compression: a compressed token stands for the window `[i*s, i*s + l)` (`s = cmp_stride`,
   `l = cmp_block`) and belongs to the chunk holding the window's last token. A chunk's windows
   reach `l - s` tokens into the chunk before it, so every chunk's last `l - s` keys/values are
   all-gathered (the halo); each rank compresses its own chunks (the learned MLP runs where the
   tokens are) and the compressed tokens, `T / s` in all, are all-gathered.
2. selection: local queries attend every compressed token at their global positions and choose
   their blocks among all selection blocks of the sequence (`nsa_select_blocks` with `q_offset`).
3. one block exchange (`parallel.blocks`) fetches, per kv head, the union of the blocks its queries
   selected and the blocks the sliding window reaches back into; the selected attention then runs
   one kv head at a time over a sequence-long buffer holding only that head's blocks (memory bounded
   by one kv head), and the window attention over the halo and the local chunk.

Communication per layer: the halos and the compressed tokens (`(P - 1) / P` of `T / s` tokens), the
need masks (one byte per block and kv head), and the blocks actually selected or in a window halo.
The backward mirrors every step through autograd.

Documents (`layout.docs`, global boundaries known to every rank): every branch gets `cu_seqlens` and
masks to each query's document; blocks are fetched only if some local query selected them (selection
ranks only blocks of the query's document) or its window reaches them, and the window halo starts
no earlier than the document of the chunk's first query.
"""

import torch
from torch import nn

from longctx.kernels import flash_attn_chunk, nsa_cmp_attn, nsa_select_attn, nsa_select_blocks
from longctx.parallel.blocks import exchange_blocks
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
        return full.chunk(2, dim=2)

    def forward(self, q, k, v, gates, compress_k, compress_v, layout):
        from longctx.model.mixers.nsa import mix_branches

        rank, size = check_zigzag(layout, self.group)
        c = self.cfg
        n_kv, groups = k.shape[2], q.shape[2] // k.shape[2]
        k_cmp, v_cmp = self.compress(k, v, compress_k, compress_v, layout, rank, size)
        docs = layout.docs
        cu = None if docs is None else docs.on(q.device)

        o_cmp, block_idx = [], []
        need = torch.zeros(n_kv, layout.seq_len // c.slc_block, dtype=torch.bool, device=q.device)
        for rows, begin, _ in _segments(layout):
            o, lse = nsa_cmp_attn(
                q[:, rows], k_cmp, v_cmp, c.cmp_block, c.cmp_stride, return_lse=True, q_offset=begin,
                cu_seqlens=cu,
            )  # fmt: skip
            o_cmp.append(o)
            idx = nsa_select_blocks(
                q[:, rows].detach(), k_cmp.detach(), lse.detach(), c.cmp_block, c.cmp_stride,
                c.slc_block, c.slc_top, q_offset=begin, cu_seqlens=cu,
            )  # fmt: skip
            block_idx.append(idx)
            chosen = idx.long().permute(2, 0, 1, 3).reshape(n_kv, -1)  # [H_kv, B * n * top]
            for g in range(n_kv):
                ids = chosen[g][chosen[g] >= 0]
                need[g, ids] = True
            first = self.window_start(begin, docs) // c.slc_block
            need[:, first : begin // c.slc_block] = True

        b, t_local, _, d = k.shape
        packed = torch.stack([k, v], dim=3).reshape(b, t_local, n_kv, 2 * d)
        fetched, table = exchange_blocks(packed, need, layout, c.slc_block, self.group)

        o_slc = self.selected(q, fetched, table, block_idx, layout, n_kv, groups, d, cu)
        o_win = self.window(q, k, v, fetched, table, layout, n_kv, d, cu)
        return mix_branches(gates, torch.cat(o_cmp, dim=1), o_slc, o_win)

    def window_start(self, begin: int, docs) -> int:
        """The first key any query of the chunk at `begin` sees through its window."""
        first = max(0, begin - self.cfg.window + 1)
        return first if docs is None else max(first, docs.first_visible(begin, 1))

    def selected(self, q, fetched, table, block_idx, layout, n_kv, groups, d, cu=None):
        """Selected-block attention, one kv head at a time over a sequence-long sparse buffer."""
        c = self.cfg
        bs = c.slc_block
        b = q.shape[0]
        per_head = []
        for g in range(n_kv):
            ids = table[g][table[g] >= 0]
            tokens = (ids[:, None] * bs + torch.arange(bs, device=q.device)).flatten()
            buffer = fetched.new_zeros(b, layout.seq_len, 2 * d)
            buffer = buffer.index_copy(1, tokens, fetched[:, : len(ids) * bs, g])
            k_g, v_g = buffer[:, :, None, :d], buffer[:, :, None, d:]
            heads = slice(g * groups, (g + 1) * groups)
            outs = [
                nsa_select_attn(
                    q[:, rows, heads], k_g, v_g, idx[:, :, g : g + 1], bs, q_offset=begin, cu_seqlens=cu
                )
                for (rows, begin, _), idx in zip(_segments(layout), block_idx)
            ]
            per_head.append(torch.cat(outs, dim=1))
        return torch.cat(per_head, dim=2)

    def window(self, q, k, v, fetched, table, layout, n_kv, d, cu=None):
        """Sliding-window attention over each local chunk and the fetched blocks before it."""
        c = self.cfg
        bs = c.slc_block
        outs = []
        for rows, begin, _ in _segments(layout):
            first = self.window_start(begin, layout.docs) // bs
            halo_ids = torch.arange(first, begin // bs, device=q.device)
            k_win, v_win = k[:, rows], v[:, rows]
            if len(halo_ids):
                # Where each halo block sits in each kv head's fetched blocks (padding sorts last).
                ordered = torch.where(table < 0, torch.iinfo(table.dtype).max, table)
                slots = torch.searchsorted(ordered, halo_ids.expand(n_kv, -1).contiguous())  # [H_kv, n]
                blocks = fetched.reshape(fetched.shape[0], -1, bs, n_kv, 2 * d)
                halo = torch.stack([blocks[:, slots[g], :, g] for g in range(n_kv)], dim=3)
                halo = halo.flatten(1, 2)  # [B, n * bs, H_kv, 2D]
                k_win = torch.cat([halo[..., :d], k_win], dim=1)
                v_win = torch.cat([halo[..., d:], v_win], dim=1)
            o, _ = flash_attn_chunk(
                q[:, rows], k_win, v_win, begin, first * bs, window=c.window, cu_seqlens=cu
            )
            outs.append(o)
        return torch.cat(outs, dim=1)
