"""Evaluation of trained models: needle-in-a-haystack retrieval and perplexity by position."""

from longctx.eval.niah import (
    NiahOptions,
    answer_logits,
    evaluate_niah,
    niah_sample,
    niah_table,
    plot_heatmap,
    write_niah,
)
from longctx.eval.ppl import evaluate_ppl, ppl_table, token_losses, write_ppl

__all__ = [
    "NiahOptions",
    "answer_logits",
    "evaluate_niah",
    "evaluate_ppl",
    "niah_sample",
    "niah_table",
    "plot_heatmap",
    "ppl_table",
    "token_losses",
    "write_niah",
    "write_ppl",
]
