"""The registry of token mixers: one letter per kind, looked up when a layer pattern is built."""

from collections.abc import Callable

from torch import nn

from longctx.config import ModelConfig

MIXERS: dict[str, type[nn.Module]] = {}


def register_mixer(letter: str) -> Callable[[type], type]:
    def wrap(cls):
        if letter in MIXERS:
            raise ValueError(f"mixer letter {letter!r} is already registered to {MIXERS[letter].__name__}")
        cls.letter = letter
        MIXERS[letter] = cls
        return cls

    return wrap


def build_mixer(letter: str, cfg: ModelConfig) -> nn.Module:
    if letter not in MIXERS:
        raise ValueError(f"unknown mixer letter {letter!r}; registered: {', '.join(sorted(MIXERS))}")
    return MIXERS[letter](cfg)


# Importing the modules registers their mixers.
from longctx.model.mixers import attention, delta, linear, nsa  # noqa: E402, F401

__all__ = ["MIXERS", "register_mixer", "build_mixer"]
