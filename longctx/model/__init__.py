"""The hybrid long-context language model (single device; see longctx.parallel for sharding)."""

from longctx.model.mixers import MIXERS, build_mixer, register_mixer
from longctx.model.transformer import Block, Transformer, build_model

__all__ = [
    "MIXERS",
    "Block",
    "Transformer",
    "build_mixer",
    "build_model",
    "register_mixer",
]
