"""Hugging Face Llama-family checkpoints in and out: Llama 2/3, Mistral and Qwen2.

    model, tokenizer = load_pretrained("hf:path/to/Llama-3-8B")             # all layers dense
    model, tokenizer = load_pretrained("hf:path/to/Llama-3-8B", layers="SSSD") # converted stack
    longctx train --config c.yaml train.init_from=hf:path/to/Llama-3-8B model.layers=LLLD

A checkpoint folder as `save_pretrained` writes it (`config.json`, `model.safetensors` or shards with
`model.safetensors.index.json`, and `tokenizer.json` or `tokenizer.model`) maps onto longctx's model
name for name: the architectures are the same decoder (RMSNorm, GQA attention with RoPE in the
rotate-half layout, SwiGLU MLP), so no tensor is permuted.

Layer conversion: `model.layers` may replace the checkpoint's dense layers. Every mixer takes the
dense layer's q/k/v/o projections (and Qwen2's q/k/v biases); what the dense layer lacks starts as
follows (see `init_converted`):

- S (S2 sparse): nothing new; the same projections attend the S2 block pattern.
- N (native sparse): `gate` (3 gates per head) starts at weight 0 and bias +4 for the selection branch,
  -4 for the compression and window branches, so the mixer starts as ~0.98 x selected-block attention
  (which is dense attention wherever every block is selected) plus small shares of the other two;
  the compressors' output matrices `w2` start at 0, so a compressed key/value is its block's mean.
- L (gated linear): `w_g` (decay), `w_og` (output gate) and `o_norm` start as in a fresh model; the
  q/k/v/o projections are the dense layer's.
- G (gated delta rule): the short convolutions on q, k and v start as the identity (the last tap 1,
  the others 0), so q, k, v are SiLU of the dense layer's projections; `w_b` (beta), the decay
  (`w_a`, `A_log`, `dt_bias`), `w_og` (output gate) and `o_norm` start as in a fresh model.

Export (`longctx export --hf`): an all-dense model becomes a folder `transformers` loads as the same
architecture. For a converted model the folder holds the same dense-named tensors plus each S/N/L/G
layer's own under `model.layers.{i}.longctx.*`, a `longctx` entry in `config.json` that
`load_pretrained` rebuilds the exact model from, and `LONGCTX.md` saying what `transformers` cannot
express.

Modules: `config.py` (config.json <-> the `model` section; `load_config` resolving `init_from=hf:`),
`weights.py` (tensors by name), `convert.py` (converted layers' new parameters), `export.py`
(`longctx export --hf`). Imported by the command line, the trainer and the exporter only: the
config and the model know nothing of Hugging Face.
"""

import warnings
from pathlib import Path

import torch

from longctx.hf.config import (
    HFCheckpointError,
    check_architecture,
    has_tokenizer,
    hf_dir,
    load_config,
    merge_model_section,
    model_section,
)
from longctx.hf.convert import init_converted
from longctx.hf.export import hf_config, write_hf
from longctx.hf.weights import load_hf_weights, local_rows


def load_pretrained(
    source: str | Path,
    layers: str | None = None,
    overrides: list[str] = (),
    device: str | torch.device = "cpu",
):
    """`(model, tokenizer)` from a Hugging Face folder `hf:DIR`: the longctx `Transformer` with the
    checkpoint's weights (in fp32, eval mode) and its tokenizer (None, with a warning, when the folder
    has no tokenizer files).

    Args:
        layers: mixer letters replacing the checkpoint's dense stack (tiled to n_layers), e.g. "LLLD".
        overrides: further `model.*=value` settings, e.g. `model.rope.scaling.type=yarn`.
    """
    from longctx.config import config_from_dict
    from longctx.model import build_model

    path = hf_dir(source)
    extra = [f"model.layers={layers}"] if layers else []
    cfg = config_from_dict({"model": model_section(path)}, [*extra, *overrides]).model
    model = build_model(cfg, device)
    init_converted(model, load_hf_weights(model, path))
    model.eval()
    tokenizer = None
    if has_tokenizer(path):
        from longctx.tokenizer import open_tokenizer

        tokenizer = open_tokenizer(path)
    else:
        warnings.warn(
            f"{str(path)!r} has no tokenizer.json or tokenizer.model: the tokenizer is None; encode text "
            "with the tokenizer the checkpoint was trained with",
            stacklevel=2,
        )
    return model, tokenizer


__all__ = [
    "HFCheckpointError",
    "check_architecture",
    "hf_config",
    "init_converted",
    "load_config",
    "load_hf_weights",
    "load_pretrained",
    "local_rows",
    "merge_model_section",
    "model_section",
    "write_hf",
]
