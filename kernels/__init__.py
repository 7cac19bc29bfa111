"""Token-mixer ops: Triton kernels with plain PyTorch references. Imports only torch (and triton
where a kernel runs). Each op picks Triton on CUDA or under `TRITON_INTERPRET=1` and the reference
elsewhere; `longctx.kernels.backend("naive" | "triton")` forces one.
"""

from longctx.kernels.common import backend, get_backend, set_backend, use_triton
from longctx.kernels.flash_attn import (
    flash_attn,
    flash_attn_chunk,
    flash_attn_chunk_bwd,
    flash_attn_chunk_fwd,
    merge_partials,
)
from longctx.kernels.gated_delta import gated_delta_rule, gated_delta_rule_step
from longctx.kernels.gla import gated_linear_attn, gated_linear_attn_step
from longctx.kernels.nsa import nsa_cmp_attn, nsa_compress, nsa_select_attn, nsa_select_blocks
from longctx.kernels.s2_attn import s2_attn

__all__ = [
    "backend",
    "get_backend",
    "set_backend",
    "use_triton",
    "flash_attn",
    "flash_attn_chunk",
    "flash_attn_chunk_fwd",
    "flash_attn_chunk_bwd",
    "merge_partials",
    "s2_attn",
    "gated_linear_attn",
    "gated_delta_rule",
    "gated_delta_rule_step",
    "gated_linear_attn_step",
    "nsa_compress",
    "nsa_cmp_attn",
    "nsa_select_blocks",
    "nsa_select_attn",
]
