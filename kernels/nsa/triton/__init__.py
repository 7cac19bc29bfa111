"""NSA's Triton kernels, one module per op, each with its launchers and autograd Function:
`cmp_attn.py` (attention over compressed tokens), `select_blocks.py` (importance + top-k),
`select_attn.py` (attention over the selected blocks); `common.py` holds NSA's tile choices and the
softmax backward's row term. Imported on first use by the public ops in `longctx.kernels.nsa`.
"""
