"""Small building blocks shared by the model: the SwiGLU MLP and the context-parallel-aware core base."""

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """`w2(silu(w1 x) * w3 x)`, the Llama MLP."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Core(nn.Module):
    """The parameter-free part of a mixer that sees the whole sequence (its attention or scan).

    A mixer computes projections per token and hands them to its core with the sequence layout.
    The cores here run one process on a whole sequence; `longctx.parallel` swaps in cores of the
    same signature that exchange what they need across context-parallel ranks.
    """

    letter = "?"

    def check_full(self, layout) -> None:
        if not layout.is_full:
            raise RuntimeError(
                f"{type(self).__name__} runs on a whole sequence but was given the shard "
                f"{layout.segments} of {layout.seq_len} tokens; wrap the model with "
                "longctx.parallel.parallelize_model to run context-parallel"
            )
