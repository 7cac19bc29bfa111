"""The hybrid long-context language model (single device; see longctx.parallel for sharding)."""

from longctx.hf import load_pretrained  # Hugging Face checkpoints (longctx.hf)
from longctx.model.mixers import MIXERS, build_mixer, register_mixer
from longctx.model.transformer import Block, Transformer, build_model

__all__ = [
    "MIXERS",
    "Block",
    "Transformer",
    "build_mixer",
    "build_model",
    "load_pretrained",
    "register_mixer",
]
