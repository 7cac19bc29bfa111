"""One writer per run directory, and a run's history never wiped without being asked (light to
import: no torch).

    lock = RunLock.acquire(run_dir)          # rank 0; ValueError naming the holder's host and pid
    check_history(run_dir, cfg, resume_from, lock)   # a fresh start over an earlier run is an error
    keep_metrics_upto(run_dir, step)         # resuming at `step`: the later records move to a .bak file
    lock.release()

The lock is `fcntl.flock` on `RUN/.lock`, held by the process that writes (rank 0 under torchrun); the
file records the holder's host, pid and torchrun rendezvous. The kernel drops a flock when its process
dies, so what a crash leaves is taken over at once; a lock whose recorded process is gone but whose
file is still locked (a forked child kept it open) is taken over too, on the same host. A torchrun
restart (same rendezvous id, a higher restart count) waits for its previous attempt's rank 0 to exit.
Locks are advisory and need a file system with working `flock` (local disks; NFSv4 and Lustre with
`-o flock`).
"""

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

LOCK = ".lock"
METRICS = "metrics.jsonl"
# How long a torchrun restart waits for the previous attempt's rank 0 to let go.
RESTART_WAIT_S = 60.0
# Locks this process holds, by run directory: a second Trainer in one process (tests, batched runs)
# takes over from the first instead of locking itself out.
_HELD: dict[str, "RunLock"] = {}


def _rendezvous() -> dict:
    return {
        "run_id": os.environ.get("TORCHELASTIC_RUN_ID"),
        "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
    }


def _restart_of(holder: dict, ours: dict) -> bool:
    """Whether we are a later attempt (restart) of the torchrun job that `holder` was part of. Without
    `--rdzv-id` every job's id is "none"; a restart count above the holder's still tells attempts of
    one job from a new launch (which starts at 0)."""
    return (
        ours["run_id"] is not None
        and holder.get("run_id") == ours["run_id"]
        and int(holder.get("restart", 0)) < ours["restart"]
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    if not holder:
        return "another process (it recorded no host or pid)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')!r} (since {since})"


class RunLock:
    def __init__(self, run_dir: Path, fd: int, previous: dict):
        self.run_dir = run_dir
        self.fd = fd
        # What the file recorded before: the last holder (a crashed or restarted one) or {}.
        self.previous = previous

    @classmethod
    def acquire(cls, run_dir: str | Path) -> "RunLock":
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        key = str(run_dir.resolve())
        if key in _HELD:
            _HELD.pop(key).release()
        path = run_dir / LOCK
        ours = {"host": socket.gethostname(), "pid": os.getpid(), **_rendezvous()}
        deadline = None
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                if holder.get("host") == ours["host"] and not _alive(int(holder.get("pid", -1))):
                    # Its process is gone; a child it forked still has the file open. A fresh file
                    # replaces it (the old one's lock then guards nothing).
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    continue
                if _restart_of(holder, ours):
                    deadline = deadline or time.monotonic() + RESTART_WAIT_S
                    if time.monotonic() < deadline:
                        time.sleep(0.5)
                        continue
                raise ValueError(
                    f"train.run_dir {str(run_dir)!r} is in use by {_describe(holder)} ({str(path)!r}): one "
                    "training run writes a run directory at a time; wait for it to finish (or stop it), or "
                    "give this run another train.run_dir"
                ) from None
            previous = _read(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps({**ours, "since": time.time()}) + "\n").encode(), 0)
            lock = cls(run_dir, fd, previous)
            _HELD[key] = lock
            return lock

    def same_lineage(self) -> bool:
        """Whether the last holder was an earlier attempt of this torchrun job (a worker restart)."""
        return _restart_of(self.previous, _rendezvous())

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
        key = str(self.run_dir.resolve())
        if _HELD.get(key) is self:
            del _HELD[key]

    def __del__(self):
        # At interpreter exit the modules release needs may be gone; the kernel drops the lock anyway.
        with contextlib.suppress(Exception):
            self.release()


def _read(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def history(run_dir: Path) -> list[str]:
    """What an earlier run left in `run_dir` that training could overwrite, one phrase each."""
    from longctx.train.checkpoint import CHECKPOINTS, checkpoint_step

    found = []
    root = run_dir / CHECKPOINTS
    if root.is_dir():
        steps = sorted(p.name for p in root.iterdir() if checkpoint_step(p) is not None)
        if steps:
            span = steps[0] if len(steps) == 1 else f"{steps[0]} .. {steps[-1]}"
            found.append(f"{len(steps)} checkpoint folder(s) ({span})")
    metrics = run_dir / METRICS
    if metrics.is_file() and metrics.stat().st_size > 0:
        lines = sum(1 for line in metrics.read_text(errors="replace").splitlines() if line.strip())
        found.append(f"{METRICS} ({lines} records)")
    return found


def check_history(run_dir: Path, cfg, resume_from: Path | None, lock: RunLock | None) -> str:
    """Before a fresh start (`resume_from` None): an error if `run_dir` holds an earlier run's
    checkpoints or metrics, unless `train.resume=none train.overwrite=true` (which clears them) or the
    run is a torchrun restart of this very job. Returns a note for the log ("" if none)."""
    if resume_from is not None:
        return ""
    found = history(run_dir)
    if not found:
        return ""
    if lock is not None and lock.same_lineage():
        return ""
    if cfg.train.overwrite:
        from longctx.train.checkpoint import CHECKPOINTS, LATEST

        root = run_dir / CHECKPOINTS
        for path in [*root.glob("step_*"), root / LATEST]:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        (run_dir / METRICS).unlink(missing_ok=True)
        return f"train.overwrite=true: removed the earlier run's {' and '.join(found)} from {run_dir}"
    why = (
        "no checkpoint in it can be resumed (see the lines above)"
        if cfg.train.resume == "auto" and any("checkpoint" in f for f in found)
        else "this run would start at step 1 over it"
    )
    resume = (
        "resume it with train.resume=auto, or train.resume=PATH for a given checkpoint"
        if cfg.train.resume == "none"
        else "resume from a good checkpoint with train.resume=PATH"
    )
    raise ValueError(
        f"train.run_dir {str(run_dir)!r} already holds a run ({', '.join(found)}) and {why}. Either "
        f"{resume}; or start afresh in a new train.run_dir (or replace this run with train.resume=none "
        "train.overwrite=true)"
    )


def keep_metrics_upto(run_dir: Path, step: int) -> Path | None:
    """Keep the records of `metrics.jsonl` up to `step` (a resumed run logs the later ones again) and
    move the others, with any line cut short by a killed writer, to `metrics.jsonl.step_N.bak`."""
    from longctx.train.checkpoint import unused_name

    path = run_dir / METRICS
    if not path.is_file():
        return None
    keep, tail = [], []
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            kept = record["step"] <= step
        except (json.JSONDecodeError, KeyError, TypeError):
            kept = False
        (keep if kept else tail).append(line)
    if not tail:
        return None
    bak = unused_name(run_dir / f"{METRICS}.step_{step}.bak")
    bak.write_text("".join(line + "\n" for line in tail))
    tmp = path.with_name(f".{METRICS}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
    return bak
