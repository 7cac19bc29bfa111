"""Make a model context-parallel: swap each mixer's core for one that exchanges what it needs.

    parallelize_model(model, cp_group, cp_comm="ring")
    parallelize_model(model, cp_group, cp_comm="usp", ulysses_size=2)   # heads in pairs, ring across

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
from longctx.parallel.usp import UspDenseCore, UspGroups, UspS2Core

DENSE_SCHEMES = {"ring": RingDenseCore, "ulysses": UlyssesDenseCore, "allgather": AllGatherDenseCore}


def _dense_core(core, group, cp_comm: str, usp=None, deterministic: bool = False):
    if cp_comm == "usp":
        return UspDenseCore(core.window, usp)
    if cp_comm not in DENSE_SCHEMES:
        raise ValueError(
            f"parallel.cp_comm={cp_comm!r} is not available for D layers; "
            f"use one of {', '.join([*DENSE_SCHEMES, 'usp'])}"
        )
    return DENSE_SCHEMES[cp_comm](core.window, group)


def _s2_core(core, group, cp_comm: str, usp=None, deterministic: bool = False, s2_exchange: str = "auto"):
    if cp_comm == "usp":
        return UspS2Core(core.cfg, usp)
    return ContextParallelS2Core(core.cfg, group, s2_exchange)


CP_CORES = {
    "D": _dense_core,
    "S": _s2_core,
    "N": lambda core, group, cp_comm, usp, deterministic: ContextParallelNSACore(core.cfg, group),
    "L": lambda core, group, cp_comm, usp, deterministic: StatePassingLinearCore(group, deterministic),
    "G": lambda core, group, cp_comm, usp, deterministic: StatePassingDeltaCore(core, group),
}


def parallelize_model(
    model: nn.Module, group, cp_comm: str, ulysses_size: int = 1, deterministic: bool = False,
    s2_exchange: str = "auto",
) -> nn.Module:  # fmt: skip
    """Replace every mixer core of `model` with its context-parallel version over `group` (in place).

    `cp_comm=usp` splits `group` into Ulysses groups of `ulysses_size` ranks and rings across them
    (`parallel.usp`; every rank of the world must call this together: it creates process groups).
    `deterministic` makes the reductions of L layers' state gradients run in a fixed order.
    `s2_exchange` (`parallel.s2_exchange`): how S layers fetch key blocks (`parallel.s2`).
    """
    usp = UspGroups(group, ulysses_size) if cp_comm == "usp" else None
    for module in list(model.modules()):
        core = getattr(module, "core", None)
        if isinstance(core, nn.Module) and getattr(core, "letter", None) in CP_CORES:
            extra = {"s2_exchange": s2_exchange} if core.letter == "S" else {}
            module.core = CP_CORES[core.letter](core, group, cp_comm, usp, deterministic, **extra)
    return model
