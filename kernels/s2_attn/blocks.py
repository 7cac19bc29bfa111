"""The block lists the S2 kernels walk: which key blocks each (head, query tile) visits, and back.

S2's pattern depends only on block indices, so it is compiled once per shape into compressed sparse
rows (CSR) and cached. A kernel program owns an outer tile of rows and walks a list of inner blocks:

- forward lists (forward and dQ kernels): one row per (query head `h`, query tile `t`), listing the
  positions `kj` of the key tensor's blocks that any query block of the tile may attend;
- transposed lists (dK/dV kernel): one row per (query head `h`, key tile `t`), listing the query
  block positions that attend any key block of the tile.

A tile is `blocks_per_tile` consecutive blocks of the tensor (1, or 2 so that 128-row GPU tiles work
with 64-token blocks). Row `r = h * n_tiles + t` holds `indices[offsets[r] : offsets[r + 1]]`, split
at `split[r]`: entries before it need no mask (every block of the tile may see every token of the
listed block: allowed, strictly before the diagonal, not a partial last block), entries after it do
(the kernel then applies S2's rule token by token). `order` lists tiles by decreasing total work, so
the longest programs launch first.

Positions index the blocks of the tensors handed to the kernel; `q_ids` / `k_ids` hold their global
block indices (`0..n-1` for a whole sequence, any strictly increasing ids for a context-parallel shard).
`k_ids` may instead be a per-kv-head block table `[H_kv, n]` (kv head `g`'s slot `s` holds global block
`k_ids[g, s]`, `-1` unused): each query head's lists then index its own kv head's slots.

    lists = s2_block_lists(16, torch.arange(2048), torch.arange(2048), 8, 16, 0, "cuda",
                           block_size=64, t_q=131072, t_k=131072)
    fwd = lists.forward(2)      # TileLists for 128-row query tiles
"""

import collections
from dataclasses import dataclass

import torch

from longctx.kernels.s2_attn.naive import s2_block_mask

_CACHE_SIZE = 32
_cache: collections.OrderedDict = collections.OrderedDict()


@dataclass(frozen=True)
class TileLists:
    """CSR of one orientation at one tile size, int32 on the kernel's device (module docstring)."""

    offsets: torch.Tensor  # [H * n_tiles + 1]
    split: torch.Tensor  # [H * n_tiles], first entry that needs a mask
    indices: torch.Tensor  # [n_entries]
    order: torch.Tensor  # [n_tiles]
    blocks_per_tile: int

    @property
    def n_tiles(self) -> int:
        return self.order.numel()


def check_block_ids(ids, n_tokens: int, block_size: int, name: str) -> torch.Tensor:
    """Global block ids of a tensor of `n_tokens` tokens as a CPU int64 tensor, `0..n-1` when None.

    Raises ValueError unless there is one id per `block_size` tokens, non-negative and strictly
    increasing.
    """
    n_blocks = -(-n_tokens // block_size)
    if ids is None:
        return torch.arange(n_blocks)
    ids = torch.as_tensor(ids).detach().to("cpu", torch.int64).flatten()
    if ids.numel() != n_blocks:
        raise ValueError(
            f"{name} must give one global block index per {block_size} tokens: {n_tokens} tokens need "
            f"{n_blocks} ids, got {ids.numel()}"
        )
    # Checked on a Python list: ids are host data, and tensor comparisons read back through .item().
    values = ids.tolist()
    if n_blocks and (values[0] < 0 or any(b <= a for a, b in zip(values, values[1:]))):
        raise ValueError(f"{name} must be non-negative and strictly increasing, got {values}")
    return ids


def check_block_table(table, n_blocks: int, name: str = "k_block_ids") -> torch.Tensor:
    """A per-kv-head key block table as a CPU int64 tensor `[H_kv, n_blocks]`.

    Row `g` names the global block held in each of kv head `g`'s `n_blocks` buffer slots: non-negative
    and strictly increasing, then `-1` for unused slots (only at the end). Raises ValueError otherwise.
    """
    table = torch.as_tensor(table).detach().to("cpu", torch.int64)
    if table.dim() != 2 or table.shape[1] != n_blocks:
        raise ValueError(
            f"{name} must be a [H_kv, {n_blocks}] table (one global block id per buffer block of each kv "
            f"head, -1 unused), got shape {tuple(table.shape)}"
        )
    for g, row in enumerate(table.tolist()):
        used = [b for b in row if b >= 0]
        ok = row == used + [-1] * (len(row) - len(used)) and all(b < c for b, c in zip(used, used[1:]))
        if not ok:
            raise ValueError(
                f"{name} row {g} must hold strictly increasing non-negative block ids followed only by "
                f"-1 (unused slots), got {row}"
            )
    return table


def _tile_csr(heads, col_partial_last: bool, tile: int, device) -> TileLists:
    """CSR over tiles of `tile` outer blocks; `heads` yields, per query head, `(mask, row_key, col_key)`:
    a `[n_rows, n_cols]` bool mask (outer blocks x inner blocks) and the keys that order rows and
    columns for causality (the same for every head, or per kv head with block tables).

    An entry needs no mask when every block of the tile may attend the inner block, its key is below
    every row key of the tile (strictly before the diagonal), and it is not a partial last block.
    """
    counts, plains, entries = [], [], []
    for mask, row_key, col_key in heads:
        n_rows, n_cols = mask.shape
        n_tiles = -(-n_rows // tile)
        pad = n_tiles * tile - n_rows
        present = (torch.arange(n_tiles * tile, device=device) < n_rows).view(n_tiles, tile, 1)
        # Padding rows repeat the last real row's key, which leaves the minimum over its tile unchanged.
        padded_keys = torch.cat([row_key, row_key[-1:].expand(pad)]) if pad else row_key
        row_min = padded_keys.view(n_tiles, tile).amin(1)
        clean_cols = col_key[None, :] < row_min[:, None]  # [n_tiles, n_cols]
        if col_partial_last:
            clean_cols[:, -1] = False
        blocks = torch.nn.functional.pad(mask, (0, 0, 0, pad)).view(n_tiles, tile, n_cols)
        union = blocks.any(1)
        every = (blocks | ~present).all(1)
        masked = union & ~(every & clean_cols)
        r, c = union.nonzero(as_tuple=True)
        # Within a row: entries without a mask first, then the masked ones, each ascending.
        key = (r * 2 + masked[r, c].long()) * n_cols + c
        entries.append(c[torch.argsort(key)])
        counts.append(union.sum(1))
        plains.append((union & ~masked).sum(1))
    counts, plains = torch.stack(counts), torch.stack(plains)  # [H, n_tiles]
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    offsets = torch.cat([zero, counts.flatten().cumsum(0)])
    return TileLists(
        offsets=offsets.to(torch.int32),
        split=(offsets[:-1] + plains.flatten()).to(torch.int32),
        indices=torch.cat(entries).to(torch.int32),
        order=torch.argsort(counts.sum(0), descending=True, stable=True).to(torch.int32),
        blocks_per_tile=tile,
    )


class S2BlockLists:
    """The S2 pattern of one (heads, params, q ids, k ids) combination, compiled into `TileLists`.

    `k_ids` is `[n_k]` (one key tensor shared by every kv head) or a `[H_kv, n_k]` block table (each kv
    head its own blocks, `-1` unused; see `check_block_table`). `forward(tile)` / `backward(tile)`
    build the forward / transposed lists for tiles of `tile` blocks on first use and keep them;
    `num_pairs` counts the allowed (head, query block, key block) triples.
    """

    def __init__(
        self, n_heads, q_ids, k_ids, local_blocks, vert_stride, dense_heads, device, q_partial, k_partial
    ):
        self.n_heads, self.device = n_heads, torch.device(device)
        self.pattern = (local_blocks, vert_stride, dense_heads)
        self.q_partial, self.k_partial = q_partial, k_partial
        self.per_kv_head = k_ids.dim() == 2
        if self.per_kv_head and n_heads % k_ids.shape[0]:
            raise ValueError(f"{n_heads} query heads do not split into {k_ids.shape[0]} kv heads' tables")
        self.q_ids = q_ids.to(self.device, torch.int32)
        self.k_ids = k_ids.to(self.device, torch.int32)  # [n_k] or [H_kv, n_k]
        # The kernels read kv head g's ids at k_ids + g * kid_stride (0: one list for every head).
        self.kid_stride = k_ids.shape[-1] if self.per_kv_head else 0
        self._q64, self._k64 = q_ids.to(self.device), k_ids.to(self.device)
        self._lists: dict = {}
        self.num_pairs = sum(int(m.sum()) for m, _ in self._masks())
        if self.num_pairs >= 2**31:
            raise ValueError(f"{self.num_pairs} (head, query block, key block) pairs overflow int32 lists")

    @property
    def n_q_blocks(self) -> int:
        return self.q_ids.numel()

    @property
    def n_k_blocks(self) -> int:
        return self.k_ids.shape[-1]

    def _masks(self):
        """Per head `([NQ, NK]` block mask, the head's key ids), one head at a time (bounds memory to
        NQ x NK booleans). Unused table slots (`-1`) are never visited."""
        group = self.n_heads // self._k64.shape[0] if self.per_kv_head else 1
        for h in range(self.n_heads):
            heads = torch.tensor([h], device=self.device)
            k_ids = self._k64[h // group] if self.per_kv_head else self._k64
            mask = s2_block_mask(self.n_heads, self._q64, k_ids, *self.pattern, heads=heads)[0]
            yield mask & (k_ids >= 0)[None, :], k_ids

    def forward(self, tile: int) -> TileLists:
        if ("fwd", tile) not in self._lists:
            heads = ((m, self._q64, k) for m, k in self._masks())
            self._lists["fwd", tile] = _tile_csr(heads, self.k_partial, tile, self.device)
        return self._lists["fwd", tile]

    def backward(self, tile: int) -> TileLists:
        if ("bwd", tile) not in self._lists:
            # Keys below every query of the tile: negate ids so "below" reads as "<" for both sides.
            heads = ((m.t(), -k, -self._q64) for m, k in self._masks())
            self._lists["bwd", tile] = _tile_csr(heads, self.q_partial, tile, self.device)
        return self._lists["bwd", tile]


def s2_block_lists(
    n_heads: int,
    q_ids: torch.Tensor,
    k_ids: torch.Tensor,
    local_blocks: int,
    vert_stride: int,
    dense_heads: int,
    device,
    block_size: int,
    t_q: int,
    t_k: int,
) -> S2BlockLists:
    """Cached `S2BlockLists`: an LRU keyed on the pattern, the device and the ids themselves.

    `q_ids` / `k_ids` are CPU int64 tensors (see `check_block_ids`; `k_ids` may be a `[H_kv, n]` table,
    `check_block_table`); their bytes and shapes are part of the key,
    so two shards with the same shape but different blocks never share lists. `t_q` / `t_k` (token
    counts) only matter through whether the last block is partial.
    """
    q_partial, k_partial = t_q % block_size != 0, t_k % block_size != 0
    key = (
        n_heads,
        local_blocks,
        vert_stride,
        dense_heads,
        str(torch.device(device)),
        q_ids.numpy().tobytes(),
        tuple(k_ids.shape),
        k_ids.numpy().tobytes(),
        q_partial,
        k_partial,
    )
    lists = _cache.get(key)
    if lists is None:
        lists = S2BlockLists(
            n_heads, q_ids, k_ids, local_blocks, vert_stride, dense_heads, device, q_partial, k_partial
        )
        _cache[key] = lists
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
    return lists
