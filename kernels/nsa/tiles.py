"""Tile-shape helpers shared by the NSA Triton launchers.

The NSA kernels lay a program's rows out as query tokens x the query heads of one kv group
(row `r` = token `r // GP`, head `r % GP`), so every K/V tile a program loads serves the whole group.
"""

import torch
import triton

LOG2E = 1.4426950408889634


def pow2_at_least_16(x: int) -> int:
    """Power-of-two tile extent covering `x`, at least 16 (the smallest `tl.dot` operand on GPUs)."""
    return max(16, triton.next_power_of_2(x))


def row_tile(n_heads_group: int, rows: int) -> tuple[int, int]:
    """`(GP, BT)`: the group's heads padded to a power of two, and the tokens per tile, so that a tile
    has about `rows` rows and at least 16."""
    gp = triton.next_power_of_2(n_heads_group)
    return gp, max(1, max(rows, 16) // gp)


def warps_for(head_dim_tile: int, rows: int = 128) -> int:
    """Warps for the attention tiles: with 128-wide heads and 64+ rows, 8 warps keep the tiles in
    registers without spills on sm_90 (checked with ptxas -v, 2 pipeline stages, bf16); smaller
    tiles fit in 4."""
    return 8 if head_dim_tile > 64 and rows > 32 else 4


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact ("ieee") for fp32 inputs, so fp32 on a GPU matches the fp32
    reference (the block choice compares importances); the default tf32 otherwise, where it only
    names the default (bf16 / fp16 operands are multiplied exactly)."""
    return "ieee" if dtype == torch.float32 else "tf32"
