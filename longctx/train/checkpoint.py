"""Checkpoints: the full training state, written atomically, loaded at any data/context-parallel degree.

    ckpt = Checkpointer(run_dir, cfg, dist_info)
    ckpt.save(step, engine, {"tokens": n, "sampler": sampler.state_dict(), "params": param_shapes(model)})
    ckpt.wait()                             # finish an asynchronous save (train.async_ckpt)
    path = find_resume(cfg, run_dir)        # train.resume: auto | none | a path
    meta = ckpt.load(path, engine)          # every rank; returns meta.json's contents
    weights = full_weights(path)            # unsharded model weights, one process, either engine

Layout of `run_dir/checkpoints/`:

    step_0000100/
        meta.json           step, tokens, LR-schedule position, data-loader position, parameter shapes,
                            the parallel layout it was written at, the resolved config, and the size
                            and checksum (xxh3-128, or sha256 without xxhash) of every other file (JSON)
        rng/rank_00000.json RNG state of every rank: python, numpy, torch, CUDA (JSON)
        state/              torch engine: a torch.distributed.checkpoint (DCP) of model + optimizer
        deepspeed/          deepspeed engine: engine.save_checkpoint(..., tag="deepspeed")
    latest                  the name of the newest complete checkpoint, replaced atomically

A checkpoint is written as `.step_0000100.tmp/` by every rank; after a barrier rank 0 writes meta.json
(the completion marker), renames the directory to `step_0000100/` and then replaces `latest`. A
directory that is still `.tmp`, or a `step_*` directory without meta.json, is never loaded, so a run
killed mid-save leaves the previous checkpoint as the one to resume from; a save that fails (a full
disk) removes its temporary directory and stops the run with one error line. Multi-node runs need
`run_dir` on a file system every node sees.

Before a checkpoint is loaded, `verify_checkpoint` checks every file against meta.json and reads the
DCP metadata: `find_good_checkpoint` skips a damaged one with a line naming the file and the reason
and takes the newest good one; a checkpoint named by path must be good.

Nothing loaded can run code: tensors are read through `longctx.train.checkpoint_io` (DCP with a
restricted metadata unpickler, DeepSpeed with `torch.load` forced to `weights_only=True`); everything
else is JSON.
"""

import hashlib
import json
import os
import random
import re
import shutil
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from longctx.config import Config, config_to_dict
from longctx.train.checkpoint_io import (
    dcp_errors,
    dcp_full_weights,
    deepspeed_full_weights,
    read_dcp_metadata,
)

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


def read_latest(run_dir: str | Path) -> tuple[str, str | None]:
    """The checkpoint name `checkpoints/latest` holds ("" if none), and why it is unusable if it is."""
    file = Path(run_dir) / CHECKPOINTS / LATEST
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        return "", None
    except OSError as e:
        return "", f"{str(file)!r} cannot be read: {e.strerror}"
    try:
        name = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        name = ""
    if checkpoint_step(Path(name)) is None or "/" in name:
        return "", f"{str(file)!r} is damaged: it does not hold a checkpoint name (step_NNNNNNN)"
    return name, None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names if it is complete, else the newest complete one, else None."""
    root = Path(run_dir) / CHECKPOINTS
    name, _ = read_latest(run_dir)
    if name and is_complete(root / name):
        return root / name
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


class DamagedCheckpoint(ValueError):
    """A checkpoint that must not be loaded; the message names the file and the reason."""


try:
    import xxhash

    HASH = "xxh3_128"
except ImportError:
    HASH = "sha256"


def file_digest(path: Path, algo: str = HASH) -> str:
    h = xxhash.xxh3_128() if algo == "xxh3_128" else hashlib.new(algo)
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _digests(files: list[Path], algo: str) -> list[str]:
    # Threads overlap reads of many files (a checkpoint has one per rank and more).
    with ThreadPoolExecutor(max_workers=min(8, len(files) or 1, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda f: file_digest(f, algo), files))


def checkpoint_files(path: Path) -> dict[str, dict]:
    """Size and checksum of every file under checkpoint directory `path` but meta.json, by relative path."""
    files = sorted(p for p in Path(path).rglob("*") if p.is_file() and p.name != META)
    return {
        str(f.relative_to(path)): {"size": f.stat().st_size, HASH: digest}
        for f, digest in zip(files, _digests(files, HASH))
    }


def verify_checkpoint(path: Path) -> dict:
    """meta.json of checkpoint `path` once every file it lists has its size and checksum and the DCP
    metadata reads safely; else DamagedCheckpoint naming the file and what is wrong with it."""
    path = Path(path)
    if not (path / META).is_file():
        raise DamagedCheckpoint(
            f"{str(path / META)!r} is missing (the save never finished, or it was deleted)"
        )
    try:
        meta = read_meta(path)
    except (ValueError, FileNotFoundError) as e:
        raise DamagedCheckpoint(str(e)) from None
    files = meta.get("files", {})
    to_hash = []
    for rel, want in files.items():
        file = path / rel
        try:
            size = file.stat().st_size
        except OSError:
            raise DamagedCheckpoint(f"checkpoint file {str(file)!r} is missing") from None
        if size != want["size"]:
            raise DamagedCheckpoint(
                f"checkpoint file {str(file)!r} has {size:,} bytes but meta.json records {want['size']:,} "
                f"({'truncated' if size < want['size'] else 'grown'})"
            )
        algo = next((a for a in ("xxh3_128", "sha256") if a in want), None)
        if algo is not None:
            to_hash.append((file, algo, want[algo]))
    for algo in {a for _, a, _ in to_hash}:
        if algo == "xxh3_128" and HASH != algo:
            raise DamagedCheckpoint(f"{str(path)!r} records xxh3 checksums: pip install xxhash to verify it")
        group = [(f, d) for f, a, d in to_hash if a == algo]
        for (file, want), got in zip(group, _digests([f for f, _ in group], algo)):
            if got != want:
                raise DamagedCheckpoint(
                    f"checkpoint file {str(file)!r} does not match its checksum in meta.json"
                )
    if meta.get("engine") == "torch":
        try:
            read_dcp_metadata(path / "state" / ".metadata")
        except (ValueError, FileNotFoundError) as e:
            raise DamagedCheckpoint(str(e)) from None
    return meta


def find_good_checkpoint(run_dir: str | Path, log=None) -> tuple[Path | None, list[str]]:
    """The newest checkpoint of `run_dir` that passes `verify_checkpoint` (the one `latest` names
    first), and a line for each one skipped on the way; each line also goes to `log` (stderr)."""
    root = Path(run_dir) / CHECKPOINTS
    log = log or (lambda line: print(f"longctx: {line}", file=sys.stderr))
    skipped = []

    def skip(line):
        skipped.append(line)
        log(line)

    name, problem = read_latest(run_dir)
    if problem:
        skip(f"ignoring {problem}")
    candidates = []
    if root.is_dir():
        found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
        candidates = sorted(found, key=checkpoint_step, reverse=True)
    if name and (root / name) in candidates:
        candidates.remove(root / name)
        candidates.insert(0, root / name)
    for path in candidates:
        try:
            verify_checkpoint(path)
        except DamagedCheckpoint as e:
            skip(f"skipping checkpoint {str(path)!r}: {e}")
            continue
        return path, skipped
    return None, skipped


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
        try:
            verify_checkpoint(path)
        except DamagedCheckpoint as e:
            raise ValueError(f"{what}: checkpoint {str(path)!r} is damaged: {e}") from None
        return path
    if checkpoint_step(path) is not None or path.name.endswith(".tmp"):
        raise ValueError(
            f"{what}: checkpoint {str(path)!r} is incomplete (no {META}: its save never finished, e.g. the "
            f"run was killed mid-save); use an earlier checkpoint from {str(path.parent)!r}"
        )
    for run_dir in (path, path.parent if path.name == CHECKPOINTS else None):
        if run_dir is not None and (run_dir / CHECKPOINTS).is_dir():
            found, skipped = find_good_checkpoint(run_dir)
            if found is None:
                why = f" ({len(skipped)} damaged: {'; '.join(skipped)})" if skipped else ""
                raise ValueError(f"{what}: {str(run_dir / CHECKPOINTS)!r} holds no good checkpoint{why}")
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
        return find_good_checkpoint(run_dir)[0]
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


def unused_name(path: Path) -> Path:
    """`path`, or `path.1`, `path.2`, ... : the first that does not exist."""
    n, found = 0, path
    while found.exists():
        n += 1
        found = path.with_name(f"{path.name}.{n}")
    return found


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
        future, error = None, None
        try:
            if self.info.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / "rng").mkdir(parents=True)
            self.info.barrier()
            _write_json(tmp / "rng" / f"rank_{self.info.rank:05d}.json", rng_state())
            future = engine.save_checkpoint(tmp, process_group=self.group, async_save=self.async_save)
        except Exception as e:
            error = e
        self._agree(error, tmp, step)
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

    def _agree(self, error: Exception | None, tmp: Path, step: int) -> None:
        """Fail on every rank if a rank's part of the save of `step` failed: remove what was written
        and raise one ValueError saying what happened and which checkpoint stays the latest."""
        failed = error is not None
        if self.info.enabled:
            from longctx.train.distributed import all_reduce_sum

            failed = all_reduce_sum([float(failed)], self.info)[0] > 0
        if not failed:
            return
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        latest = latest_checkpoint(self.root.parent)
        if error is None:
            what = "another rank's write failed"
        elif isinstance(error, OSError):
            what = f"{error.strerror or error}" + (f" ({error.filename})" if error.filename else "")
        else:
            # torch's file writers report a short write (a full disk) as a RuntimeError.
            what = f"a write failed ({type(error).__name__}: {str(error).splitlines()[0]})"
        raise ValueError(
            f"saving checkpoint {step_name(step)} in {str(self.root)!r} failed: {what}; nothing of it was "
            f"kept and the run stops here. "
            + (f"{latest.name} stays the latest checkpoint" if latest else "There is no earlier checkpoint")
            + "; free space (or fix permissions) and run the same command again to resume"
        ) from None

    def wait(self) -> None:
        """Finish the pending save: every rank's files are written, then rank 0 checksums them, marks
        the checkpoint complete, renames it, points `latest` at it and prunes old checkpoints."""
        if self.pending is None:
            return
        future, tmp, meta = self.pending
        self.pending = None
        error = None
        if future is not None:
            try:
                with dcp_errors(tmp):
                    future.result()
            except Exception as e:
                error = e
        self._agree(error, tmp, meta["step"])
        final = self.root / step_name(meta["step"])
        if self.info.is_main:
            try:
                meta["files"] = checkpoint_files(tmp)
                _write_json(tmp / META, meta)
                _fsync_dir(tmp)
            except OSError as e:
                error = e
        self._agree(error, tmp, meta["step"])
        if self.info.is_main:
            if final.exists():
                # A checkpoint of this step that this run did not write (one it skipped as damaged, or
                # a later one of a run resumed from an earlier step): kept aside, never deleted.
                aside = unused_name(final.with_name(f"{final.name}.replaced"))
                final.rename(aside)
                print(f"longctx: moved the earlier {final.name} aside to {aside.name}", file=sys.stderr)
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

    def load(self, path: Path, engine) -> dict:
        """Load the full training state of checkpoint `path` into `engine` and the RNGs of this rank
        (its parameters checked against the model's first: `longctx.weights.check_weights`); return
        its meta (step, tokens, sampler, ...) for the trainer."""
        meta = read_meta(path)
        if meta["engine"] != self.cfg.parallel.engine:
            raise ValueError(
                f"checkpoint {str(path)!r} was written by parallel.engine={meta['engine']}; resume it with "
                f"that engine, or load only its weights into a new train.run_dir with train.init_from={path}"
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
