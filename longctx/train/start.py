"""How a run starts, decided once before anything is built: fresh, resumed from a checkpoint, or a new run
initialised from other weights.

    start = plan_start(cfg, run_dir, world_size=dp * cp, lock=lock)   # rank 0; the trainer broadcasts it
    start.kind              # "fresh" | "resume" | "init"
    start.resume_from       # the checkpoint to resume (train.resume), or None
    start.init_from         # train.init_from, when it is used (a new run only), or None
    start.universal         # the DeepSpeed checkpoint must go through the universal format first
    start.on_meta           # build the model on the meta device (FSDP materialises its shards)
    start.zero_init         # build on meta and partition for DeepSpeed ZeRO-3 before the engine

The trainer then carries it out in order (`Trainer.__init__`): build the model (on meta or the
device), load `init_from` (into the plain model, or per shard after the engine is built for an
FSDP2 model), `convert_to_universal` if needed, build the engine, load the checkpoint and the data
position.
"""

from dataclasses import dataclass
from pathlib import Path

from longctx.config import Config
from longctx.train.checkpoint import find_resume, read_meta
from longctx.train.run_dir import check_history
from longctx.train.zero3 import uses_zero_init


@dataclass(frozen=True)
class Start:
    resume_from: Path | None = None
    init_from: str | None = None
    universal: bool = False
    on_meta: bool = False
    zero_init: bool = False
    # For the log: what check_history did to the run directory ("" if nothing).
    note: str = ""

    @property
    def kind(self) -> str:
        return "resume" if self.resume_from is not None else "init" if self.init_from else "fresh"

    @property
    def init_sharded(self) -> bool:
        """`init_from` is read slice by slice into a sharded model (after the engine is built)."""
        return self.init_from is not None and self.on_meta


def needs_universal(meta: dict, cfg: Config, world_size: int) -> bool:
    """Whether a checkpoint (its `meta`) must go through DeepSpeed's universal format to be resumed
    by `cfg` on `world_size` (= dp x cp) processes: DeepSpeed loads its own checkpoint only at the
    DP x CP degree and ZeRO-3-ness it was written at."""
    if cfg.parallel.engine != "deepspeed" or meta["engine"] != "deepspeed":
        return False
    same_degree = meta["dp_size"] * meta["cp_size"] == world_size
    return not (same_degree and (meta["zero_stage"] == 3) == (cfg.parallel.zero_stage == 3))


def plan_start(cfg: Config, run_dir: str | Path, world_size: int, lock=None) -> Start:
    """How the run in `run_dir` starts (see the module docstring). Reads the file system: call it on
    rank 0, holding the run directory's `lock`; an error if a fresh start would overwrite an earlier
    run (`longctx.train.run_dir.check_history`)."""
    run_dir = Path(run_dir)
    resume_from = find_resume(cfg, run_dir)
    note = check_history(run_dir, cfg, resume_from, lock)
    init_from = cfg.train.init_from if resume_from is None and cfg.train.init_from else None
    # FSDP2: every rank builds on meta and materialises its shards only; init_from weights are read
    # into the shards afterwards, each rank its rows (longctx.train.sharded_load).
    on_meta = cfg.parallel.fsdp and not cfg.model.tie_embeddings
    # DeepSpeed ZeRO-3: every rank builds on meta and keeps its partition of each parameter, made one
    # at a time (longctx.train.zero3); init_from weights are read into the partitions.
    zero_init = uses_zero_init(cfg, world_size)
    universal = resume_from is not None and needs_universal(read_meta(resume_from), cfg, world_size)
    return Start(resume_from, init_from, universal, on_meta, zero_init, note)
