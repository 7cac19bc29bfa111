"""Dense softmax attention (the D mixer, NSA's window branch, ring attention's building block).

`flash_attn` for a whole sequence; `flash_attn_chunk` / `flash_attn_chunk_fwd` / `flash_attn_chunk_bwd`
for one (query chunk, key chunk) pair at global offsets; `merge_partials` for the lse merge. Triton
kernels in `triton.py`, references in `naive.py`, dispatch and autograd in `interface.py`.
"""

from longctx.kernels.flash_attn.interface import (
    flash_attn,
    flash_attn_chunk,
    flash_attn_chunk_bwd,
    flash_attn_chunk_fwd,
    merge_partials,
)
from longctx.kernels.flash_attn.naive import attention_bwd_ref, attention_ref, merge_partials_ref

__all__ = [
    "flash_attn",
    "flash_attn_chunk",
    "flash_attn_chunk_fwd",
    "flash_attn_chunk_bwd",
    "merge_partials",
    "attention_ref",
    "attention_bwd_ref",
    "merge_partials_ref",
]
