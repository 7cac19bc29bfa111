"""Checkpoints: the full training state, written atomically, loaded at any data/context-parallel degree.

    ckpt = Checkpointer(run_dir, cfg, dist_info)
    ckpt.save(step, engine, {"tokens": n, "sampler": sampler.state_dict(), "params": param_shapes(model)})
    ckpt.wait()                             # finish an asynchronous save (train.async_ckpt)
    path = find_resume(cfg, run_dir)        # train.resume: auto | none | a path
    meta = ckpt.load(path, engine, param_shapes(model))   # every rank; returns meta.json's contents
    weights = full_weights(path)            # unsharded model weights, one process, either engine

Layout of `run_dir/checkpoints/`:

    step_0000100/
        meta.json           step, tokens, LR-schedule position, data-loader position, parameter shapes,
                            the parallel layout it was written at and the resolved config (JSON)
        rng/rank_00000.json RNG state of every rank: python, numpy, torch, CUDA (JSON)
        state/              torch engine: a torch.distributed.checkpoint (DCP) of model + optimizer
        deepspeed/          deepspeed engine: engine.save_checkpoint(..., tag="deepspeed")
    latest                  the name of the newest complete checkpoint, replaced atomically

A checkpoint is written as `.step_0000100.tmp/` by every rank; after a barrier rank 0 writes meta.json
(the completion marker), renames the directory to `step_0000100/` and then replaces `latest`. A
directory that is still `.tmp`, or a `step_*` directory without meta.json, is never loaded, so a run
killed mid-save (or a full disk) leaves the previous checkpoint as the one to resume from. Multi-node
runs need `run_dir` on a file system every node sees.

Nothing loaded can run code: tensors are read through `longctx.train.checkpoint_io` (DCP with a
restricted metadata unpickler, DeepSpeed with `torch.load` forced to `weights_only=True`); everything
else is JSON.
"""

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from longctx.config import Config, config_to_dict
from longctx.train.checkpoint_io import dcp_errors, dcp_full_weights, deepspeed_full_weights

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step_(\d+)$")


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoint_step(path: Path) -> int | None:
    match = _STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    """A finished checkpoint: a `step_N` directory (renamed from its temporary name) with meta.json."""
    path = Path(path)
    return checkpoint_step(path) is not None and (path / META).is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names if it is complete, else the newest complete one, else None."""
    root = Path(run_dir) / CHECKPOINTS
    try:
        name = (root / LATEST).read_text().strip()
    except OSError:
        name = ""
    if name and is_complete(root / name):
        return root / name
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path, what: str) -> Path:
    """A complete checkpoint from a checkpoint directory or a run directory (its latest); `what` names
    the setting the path came from, for the error message."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{what}: {str(path)!r} does not exist; give a run directory or its checkpoints/step_NNNNNNN"
        )
    # A checkpoint given by path may have been copied under another name; meta.json marks it complete.
    if (path / META).is_file():
        return path
    if checkpoint_step(path) is not None or path.name.endswith(".tmp"):
        raise ValueError(
            f"{what}: checkpoint {str(path)!r} is incomplete (no {META}: its save never finished, e.g. the "
            f"run was killed mid-save); use an earlier checkpoint from {str(path.parent)!r}"
        )
    for run_dir in (path, path.parent if path.name == CHECKPOINTS else None):
        if run_dir is not None and (run_dir / CHECKPOINTS).is_dir():
            found = latest_checkpoint(run_dir)
            if found is None:
                raise ValueError(f"{what}: {str(run_dir / CHECKPOINTS)!r} holds no complete checkpoint")
            return found
    raise ValueError(
        f"{what}: {str(path)!r} is not a checkpoint: expected a directory with {META} "
        f"({CHECKPOINTS}/step_NNNNNNN) or a run directory with a {CHECKPOINTS}/ folder"
    )


def find_resume(cfg: Config, run_dir: str | Path) -> Path | None:
    """The checkpoint `train.resume` asks for: auto (the latest complete one in run_dir, if any), none,
    or a path."""
    resume = cfg.train.resume
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    return resolve_checkpoint(resume, "train.resume")


def read_meta(path: str | Path) -> dict:
    file = Path(path) / META
    try:
        meta = json.loads(file.read_text())
    except OSError as e:
        raise FileNotFoundError(f"checkpoint file {str(file)!r} cannot be read: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise ValueError(
            f"checkpoint file {str(file)!r} is not valid JSON ({e}); the checkpoint is damaged"
        ) from e
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{str(file)!r} has checkpoint format {meta.get('format')!r}; this longctx reads format "
            f"{FORMAT_VERSION}"
        )
    return meta


def check_param_shapes(saved: dict, model: dict, source: str) -> None:
    """Raise naming the first parameter that is missing, unexpected or of another shape."""
    for name, shape in model.items():
        if name not in saved:
            raise ValueError(
                f"{source} does not fit this model: it has no parameter {name!r} (shape {list(shape)}); "
                "resume with the model config it was written with (see its meta.json), or start fresh with "
                "train.resume=none"
            )
        if list(saved[name]) != list(shape):
            raise ValueError(
                f"{source} does not fit this model: parameter {name!r} has shape {list(saved[name])} in the "
                f"checkpoint but {list(shape)} in the model; use the model config it was written with (see "
                "its meta.json), or start fresh with train.resume=none"
            )
    extra = sorted(set(saved) - set(model))
    if extra:
        raise ValueError(
            f"{source} does not fit this model: it holds parameter {extra[0]!r} (shape "
            f"{list(saved[extra[0]])}) that the model lacks; use the model config it was written with (see "
            "its meta.json)"
        )


def param_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    """Full (unsharded) shapes of the model's persistent tensors, by name."""
    return {name: list(t.shape) for name, t in model.state_dict().items()}


def rng_state() -> dict:
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(words), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        for device in range(min(len(cuda), torch.cuda.device_count())):
            torch.cuda.set_rng_state(torch.tensor(cuda[device], dtype=torch.uint8), device)


def full_weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's model weights, unsharded, on the CPU, whichever engine wrote it."""
    meta = read_meta(path)
    if meta["engine"] == "deepspeed":
        return deepspeed_full_weights(path / "deepspeed")
    return dcp_full_weights(path / "state")


def _write_json(path: Path, data) -> None:
    """Write JSON atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """Saves and loads the checkpoints of one run; every rank holds one and calls save/load together."""

    def __init__(self, run_dir: str | Path, cfg: Config, info):
        self.root = Path(run_dir) / CHECKPOINTS
        self.cfg = cfg
        self.info = info
        self.async_save = cfg.train.async_ckpt and cfg.parallel.engine == "torch"
        # A pending asynchronous save: (future, temporary dir, meta).
        self.pending = None
        self.group = None
        if self.async_save and dist.is_initialized():
            # DCP's background thread runs its collectives on a group of its own, never the training one.
            self.group = dist.new_group(backend="gloo")
        elif self.async_save:
            # The background thread's one-process warning, which quiet_single_process cannot reach.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")

    def save(self, step: int, engine, state: dict) -> None:
        """Write checkpoint `step`. `state` holds the JSON-able rest: tokens, sampler, params."""
        self.wait()
        name = step_name(step)
        tmp = self.root / f".{name}.tmp"
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        self.info.barrier()
        _write_json(tmp / "rng" / f"rank_{self.info.rank:05d}.json", rng_state())
        future = engine.save_checkpoint(tmp, process_group=self.group, async_save=self.async_save)
        scheduler = engine.scheduler
        meta = {
            "format": FORMAT_VERSION,
            "step": step,
            **state,
            "engine": self.cfg.parallel.engine,
            "world_size": self.info.world_size,
            "dp_size": self.info.dp_size,
            "cp_size": self.info.cp_size,
            "zero_stage": self.cfg.parallel.zero_stage,
            "fsdp": self.cfg.parallel.fsdp,
            "scheduler": {"last_epoch": scheduler.last_epoch, "step_count": scheduler._step_count},
            "torch_version": torch.__version__,
            "config": config_to_dict(self.cfg),
        }
        self.pending = (future, tmp, meta)
        if future is None:
            self.wait()

    def wait(self) -> None:
        """Finish the pending save: every rank's files are written, then rank 0 marks it complete,
        renames it, points `latest` at it and prunes old checkpoints."""
        if self.pending is None:
            return
        future, tmp, meta = self.pending
        self.pending = None
        if future is not None:
            with dcp_errors(tmp):
                future.result()
        self.info.barrier()
        if self.info.is_main:
            _write_json(tmp / META, meta)
            _fsync_dir(tmp)
            final = self.root / step_name(meta["step"])
            if final.exists():
                # A checkpoint of the same step from an earlier attempt (train.resume=none): replace it.
                old = self.root / f".{final.name}.old"
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                shutil.rmtree(old)
            tmp.rename(final)
            _fsync_dir(self.root)
            latest = self.root / LATEST
            partial = self.root / f".{LATEST}.tmp"
            partial.write_text(final.name + "\n")
            os.replace(partial, latest)
            self.prune(keep=final)
        self.info.barrier()

    def prune(self, keep: Path) -> None:
        """Delete stale temporary directories and all but the newest `train.keep_last` checkpoints
        (0 keeps every one); never the one `latest` names."""
        for stale in self.root.glob(".step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        keep_last = self.cfg.train.keep_last
        if keep_last == 0:
            return
        complete = list_checkpoints(self.root.parent)
        for old in complete[:-keep_last]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, engine, model_shapes: dict) -> dict:
        """Load the full training state of checkpoint `path` into `engine` and the RNGs of this rank;
        return its meta (step, tokens, sampler, ...) for the trainer."""
        meta = read_meta(path)
        check_param_shapes(meta["params"], model_shapes, f"checkpoint {str(path)!r}")
        if meta["engine"] != self.cfg.parallel.engine:
            raise ValueError(
                f"checkpoint {str(path)!r} was written by parallel.engine={meta['engine']}; resume it with "
                f"that engine, or load only its weights with train.init_from={path} train.resume=none"
            )
        engine.load_checkpoint(path, meta)
        scheduler = engine.scheduler
        scheduler.last_epoch = meta["scheduler"]["last_epoch"]
        scheduler._step_count = meta["scheduler"]["step_count"]
        # The LR the next step uses, from this run's schedule (identical to the saved one when the
        # schedule settings are unchanged).
        lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs
        rng_file = path / "rng" / f"rank_{self.info.rank:05d}.json"
        if meta["world_size"] == self.info.world_size and rng_file.is_file():
            try:
                set_rng_state(json.loads(rng_file.read_text()))
            except (OSError, json.JSONDecodeError, KeyError, ValueError) as e:
                raise ValueError(f"checkpoint file {str(rng_file)!r} cannot be read: {e}") from e
        else:
            # Another number of ranks: there is no state for this rank; reseed from the step instead.
            seed = self.cfg.train.seed + meta["step"] * 1_000_003 + self.info.rank
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
        return meta
