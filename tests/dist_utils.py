"""Run a function in several gloo processes and collect what each returns; run the CLI under torchrun.

    results = spawn(worker, world_size=2, args=(x,))   # worker(rank, world_size, *args) -> picklable

Workers set up the default process group themselves through `init_worker`. Results come back
through files, so they can hold tensors.
"""

import datetime
import json
import os
import pickle
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longctx.train.distributed import free_port, torchrun_command

REPO = Path(__file__).resolve().parent.parent


# How long a worker waits in one collective before it gives up: a rank that raised while the others
# wait in a collective would otherwise hang the batched spawn until pytest's timeout, with no error.
COLLECTIVE_TIMEOUT_S = int(os.environ.get("LONGCTX_TEST_COLLECTIVE_TIMEOUT", "300"))


def _entry(rank, world_size, port, out_dir, fn, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    )
    try:
        result, error = fn(rank, world_size, *args), None
    except Exception:
        result, error = None, traceback.format_exc()
    # The result is written before the closing barrier, so a rank's own error survives a peer that
    # never reaches it.
    with open(Path(out_dir) / f"{rank}.pkl", "wb") as f:
        pickle.dump((result, error), f)
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _waited(error: str) -> bool:
    """Whether a rank's error is a peer's symptom (it timed out waiting, or died) rather than a cause."""
    text = error.lower()
    return "timed out" in text or "timeout" in text or text.startswith("no result")


def spawn(fn, world_size: int, args: tuple = ()) -> list:
    """Run `fn(rank, world_size, *args)` in `world_size` gloo processes; return their results by rank.
    Every failing rank's traceback is reported, the first rank's that is not a collective timeout
    first (that one is usually the cause, the timeouts its peers waiting for it)."""
    with tempfile.TemporaryDirectory() as out_dir:
        launch_error = None
        try:
            args_ = (world_size, free_port(), out_dir, fn, args)
            mp.start_processes(_entry, args=args_, nprocs=world_size, start_method="spawn")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:  # results below say why
            launch_error = e
        results, errors = [], []
        for rank in range(world_size):
            path = Path(out_dir) / f"{rank}.pkl"
            if not path.exists():
                errors.append((rank, f"no result (the process died):\n{launch_error}"))
                results.append(None)
                continue
            with open(path, "rb") as f:
                result, error = pickle.load(f)
            if error:
                errors.append((rank, error))
            results.append(result)
        if errors:
            errors.sort(key=lambda e: (_waited(e[1]), e[0]))
            raise AssertionError("\n".join(f"rank {rank} failed:\n{error}" for rank, error in errors))
    return results


def run_cli(
    args: list[str],
    nproc: int = 1,
    torchrun_args: list[str] = (),
    timeout: int = 600,
    env=None,
    module="longctx",
):
    """Run `longctx ...` (under torchrun when nproc > 1); return the CompletedProcess. `module` runs
    another entry point taking the same arguments (tests/kill_at_step.py)."""
    if nproc > 1 or torchrun_args:
        cmd = torchrun_command(nproc, module, args, torchrun_args)
    else:
        cmd = [sys.executable, "-m", module, *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)


def losses(run_dir) -> list[float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def run_many(runs: list[tuple], nproc: int, tmp_path, timeout: int = 900) -> None:
    """Train every `(run_dir, overrides)` or `(run_dir, overrides, config)` in one torchrun launch of
    `nproc` processes (tests/cp_runs.py); config defaults to configs/tiny.yaml."""
    spec = Path(tmp_path) / f"spec-{nproc}.json"
    entries = []
    for run_dir, overrides, *rest in runs:
        entry = {"run_dir": str(run_dir), "overrides": list(overrides)}
        if rest:
            entry["config"] = str(rest[0])
        entries.append(entry)
    spec.write_text(json.dumps(entries))
    cmd = torchrun_command(nproc, "tests.cp_runs", [str(spec)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
