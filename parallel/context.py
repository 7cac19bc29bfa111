"""Make a model context-parallel: swap each mixer's core for one that exchanges what it needs.

    parallelize_model(model, cp_group, cp_comm="ring")

The model code stays single-device: a mixer computes its per-token projections and hands them to its
core with the `SeqLayout` of the local tokens; the cores installed here run on a zigzag shard and
talk to the other ranks of `cp_group`.
"""

from torch import nn

from longctx.parallel.delta import StatePassingDeltaCore
from longctx.parallel.dense import AllGatherDenseCore
from longctx.parallel.linear import StatePassingLinearCore
from longctx.parallel.nsa import ContextParallelNSACore
from longctx.parallel.ring import RingDenseCore
from longctx.parallel.s2 import ContextParallelS2Core
from longctx.parallel.ulysses import UlyssesDenseCore

DENSE_SCHEMES = {"ring": RingDenseCore, "ulysses": UlyssesDenseCore, "allgather": AllGatherDenseCore}


def _dense_core(core, group, cp_comm: str):
    if cp_comm not in DENSE_SCHEMES:
        raise ValueError(
            f"parallel.cp_comm={cp_comm!r} is not available for D layers; "
            f"use one of {', '.join(DENSE_SCHEMES)}"
        )
    return DENSE_SCHEMES[cp_comm](core.window, group)


CP_CORES = {
    "D": _dense_core,
    "S": lambda core, group, cp_comm: ContextParallelS2Core(core.cfg, group),
    "N": lambda core, group, cp_comm: ContextParallelNSACore(core.cfg, group),
    "L": lambda core, group, cp_comm: StatePassingLinearCore(group),
    "G": lambda core, group, cp_comm: StatePassingDeltaCore(core, group),
}


def parallelize_model(model: nn.Module, group, cp_comm: str) -> nn.Module:
    """Replace every mixer core of `model` with its context-parallel version over `group` (in place)."""
    for module in list(model.modules()):
        core = getattr(module, "core", None)
        if isinstance(core, nn.Module) and getattr(core, "letter", None) in CP_CORES:
            module.core = CP_CORES[core.letter](core, group, cp_comm)
    return model
