"""Runs that cannot be hijacked or destroyed: crafted pickles refused by every loader, one writer per
run directory, history kept, damaged checkpoints skipped, failed saves clean, exports never overwrite.

Every training here is a tiny in-process run (one dense layer, seq_len 64); the module's runs share
one data cache. Each crafted file carries `touch MARKER`; the tests check that the marker never
appears, and that the same bytes given to plain `pickle.loads` do create it (the payload is live).
"""

import io
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longctx.cli import main
from longctx.config import load_config
from longctx.data import PackedSampler
from longctx.model import build_model
from longctx.train.checkpoint import (
    META,
    Checkpointer,
    checkpoint_files,
    find_good_checkpoint,
    latest_checkpoint,
)
from longctx.train.checkpoint_io import dcp_full_weights, read_dcp_metadata
from longctx.train.distributed import DistInfo
from longctx.train.metrics import plot_loss
from longctx.train.run_dir import RunLock
from tests.dist_utils import losses, metrics

CONFIG = "configs/tiny.yaml"
OVERRIDES = [
    "model.layers=D",
    "model.n_layers=1",
    "data.seq_len=64",
    "train.batch_size=1",
    "train.warmup=2",
    "train.wandb=false",
    "train.progress=false",
]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("safety-cache")


def train(cache, run_dir, *overrides) -> int:
    args = ["train", "--config", CONFIG, *OVERRIDES, f"data.cache_dir={cache}", f"train.run_dir={run_dir}"]
    return main([*args, *overrides])


@pytest.fixture(scope="module")
def base_run(cache, tmp_path_factory):
    """Four steps, checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("safety") / "base"
    assert train(cache, run, "train.steps=4", "train.ckpt_every=2", "train.keep_last=0") == 0
    return run


def copy_run(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:07d}"


def rehash(ckpt: Path) -> None:
    """Record the checkpoint's current files in meta.json, as an attacker who edits a run would: the
    checksums then pass, and only the loaders stand between the file and the command it carries."""
    meta = json.loads((ckpt / META).read_text())
    meta["files"] = checkpoint_files(ckpt)
    (ckpt / META).write_text(json.dumps(meta))


class Reduce:
    """Pickles as `fn(*args)`."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _proto4_global(module: str, name: str, arg: str) -> bytes:
    """Protocol 4: STACK_GLOBAL `module` `name`, called with one string."""

    def s(text):
        data = text.encode()
        return b"\x8c" + bytes([len(data)]) + data

    return b"\x80\x04" + s(module) + s(name) + b"\x93" + s(arg) + b"\x85R."


def payloads(marker: Path) -> dict[str, tuple[bytes, bool]]:
    """name -> (pickle bytes, whether plain pickle.loads runs the command)."""
    import torch.distributed.checkpoint.metadata as md

    touch = f"touch {marker}"
    return {
        "GLOBAL-os.system": (f"cos\nsystem\n(V{touch}\ntR.".encode(), True),
        "GLOBAL-dotted-name": (
            b"\x80\x04ctorch.distributed.checkpoint.metadata\nos.system\n(V" + touch.encode() + b"\ntR.",
            True,
        ),
        "STACK_GLOBAL-dotted-name": (
            _proto4_global("torch.distributed.checkpoint.metadata", "os.system", touch),
            True,
        ),
        "subprocess": (pickle.dumps(Reduce(subprocess.check_call, ["touch", str(marker)])), True),
        "builtins.eval": (
            pickle.dumps(Reduce(eval, f"__import__('os').system({touch!r})")),
            True,
        ),
        "INST-opcode": (f"(V{touch}\nios\nsystem\n.".encode(), True),
        # An allowed class whose contents reduce to a call outside the list.
        "reduce-inside-allowed-class": (
            pickle.dumps(md.Metadata(state_dict_metadata={"x": Reduce(os.system, touch)}), protocol=4),
            True,
        ),
        # BUILD on an allowed class itself would set its attributes (plain pickle does it; not run).
        "BUILD-on-allowed-class": (
            b"\x80\x04\x8c%torch.distributed.checkpoint.metadata\x8c\x08Metadata\x93"
            b"N}\x8c\n__reduce__\x8c\x01xs\x86b.",
            False,
        ),
    }


@pytest.mark.parametrize("name", list(payloads(Path("m"))))
def test_dcp_metadata_unpickler_refuses_crafted_pickles(tmp_path, name):
    marker = tmp_path / "pwned"
    data, live = payloads(marker)[name]
    file = tmp_path / ".metadata"
    file.write_bytes(data)
    with pytest.raises(ValueError, match=f"checkpoint file '{file}'") as error:
        read_dcp_metadata(file)
    assert "cannot be loaded safely" in str(error.value) or "damaged" in str(error.value)
    assert not marker.exists()
    if live:
        # The refusal is what stopped it: the same bytes run the command through plain pickle.
        try:
            pickle.loads(data)
        except Exception:
            pass
        assert marker.exists()


@pytest.mark.parametrize("name", list(payloads(Path("m"))))
def test_crafted_checkpoints_are_refused_by_train_eval_export_and_init_from(base_run, tmp_path, capsys, name):
    marker = tmp_path / "pwned"
    run = copy_run(base_run, tmp_path / "run")
    metadata_payload = payloads(marker)[name][0]
    for step in (2, 4):
        (step_dir(run, step) / "state" / ".metadata").write_bytes(metadata_payload)
        rehash(step_dir(run, step))
    evil = str(step_dir(run, 4) / "state" / ".metadata")

    def fails(*args):
        capsys.readouterr()
        assert main(list(args)) == 2
        err = capsys.readouterr().err
        assert evil in err and "cannot be loaded safely" in err, err
        return err

    err = fails("train", "--config", CONFIG, *OVERRIDES, f"train.run_dir={run}", "train.steps=6")
    assert "skipping checkpoint" in err and "already holds a run" in err
    fails("train", "--config", CONFIG, *OVERRIDES, f"train.run_dir={run}", f"train.resume={step_dir(run, 4)}")
    fails("eval", "niah", "--run", str(run), "--lengths", "64", "--depths", "0.5", "--samples", "1")
    fails("export", "--run", str(run), "--out", str(tmp_path / "out"))
    fails(
        "train", "--config", CONFIG, *OVERRIDES, f"train.run_dir={tmp_path / 'new'}", f"train.init_from={run}"
    )
    # Loading without the check before it refuses too.
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        dcp_full_weights(step_dir(run, 4) / "state")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_pickle_inside_a_tensor_blob_is_refused_naming_the_file(base_run, tmp_path, capsys):
    """A `.distcp` whose tensor record is a `torch.save` of code (its metadata pointing at it)."""
    marker = tmp_path / "pwned"
    run = copy_run(base_run, tmp_path / "run")
    ckpt = step_dir(run, 4)
    blob = io.BytesIO()
    torch.save(Reduce(os.system, f"touch {marker}"), blob)
    metadata = read_dcp_metadata(ckpt / "state" / ".metadata")
    distcp = ckpt / "state" / "__0_0.distcp"
    for info in metadata.storage_data.values():
        info.offset, info.length = 0, len(blob.getvalue())
    distcp.write_bytes(blob.getvalue())
    (ckpt / "state" / ".metadata").write_bytes(pickle.dumps(metadata))
    rehash(ckpt)
    capsys.readouterr()
    args = ["train", "--config", CONFIG, *OVERRIDES, f"train.run_dir={run}", f"train.resume={ckpt}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"checkpoint file '{distcp}' cannot be loaded safely: it holds posix.system" in err, err
    assert len(err.splitlines()) == 1, err
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    assert f"'{distcp}' cannot be loaded safely" in capsys.readouterr().err
    assert not marker.exists()
    # The blob is live: plain torch.load runs it.
    torch.load(io.BytesIO(blob.getvalue()), weights_only=False)
    assert marker.exists()


def test_damaged_newest_checkpoint_is_skipped_and_resume_matches_a_direct_one(
    base_run, tmp_path, cache, capsys
):
    run = copy_run(base_run, tmp_path / "run")
    before = (run / "metrics.jsonl").read_text()
    distcp = step_dir(run, 4) / "state" / "__0_0.distcp"
    size = distcp.stat().st_size
    with open(distcp, "r+b") as f:
        f.truncate(size // 2)
    capsys.readouterr()
    assert train(cache, run, "train.steps=4", "train.ckpt_every=2", "train.keep_last=0") == 0
    err = capsys.readouterr().err
    skipped = [line for line in err.splitlines() if "skipping" in line]
    assert skipped == [
        f"longctx: skipping checkpoint '{step_dir(run, 4)}': checkpoint file '{distcp}' has {size // 2:,} "
        f"bytes but meta.json records {size:,} (truncated)"
    ], err
    # Resumed at step 2: the same losses as a run resumed there directly, and as the straight run.
    direct = tmp_path / "direct"
    assert train(cache, direct, "train.steps=4", f"train.resume={step_dir(base_run, 2)}") == 0
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
    assert losses(run)[2:] == losses(direct) == losses(base_run)[2:]
    # Nothing was deleted: the cut records and the damaged checkpoint were moved aside.
    assert (run / "metrics.jsonl.step_2.bak").read_text() == "".join(
        line + "\n" for line in before.splitlines() if json.loads(line)["step"] > 2
    )
    assert (
        run / "checkpoints" / "step_0000004.replaced" / "state" / "__0_0.distcp"
    ).stat().st_size == size // 2
    assert latest_checkpoint(run) == step_dir(run, 4)

    # Garbage in `latest`: one line, and the newest good checkpoint is used.
    (run / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00\x81garbage")
    found, lines = find_good_checkpoint(run, log=lambda line: None)
    assert found == step_dir(run, 4) and len(lines) == 1 and "latest' is damaged" in lines[0]

    # A changed byte (same size) fails its checksum; naming that checkpoint is an error.
    rng = step_dir(run, 2) / "rng" / "rank_00000.json"
    rng.write_bytes(rng.read_bytes().replace(b"[", b" ", 1))
    capsys.readouterr()
    assert train(cache, tmp_path / "other", f"train.resume={step_dir(run, 2)}") == 2
    assert f"checkpoint file '{rng}' does not match its checksum in meta.json" in capsys.readouterr().err


def test_history_is_never_wiped_without_overwrite(base_run, tmp_path, cache, capsys):
    run = copy_run(base_run, tmp_path / "run")
    before = (run / "metrics.jsonl").read_bytes()
    config = (run / "config.yaml").read_bytes()

    def fails(*overrides):
        capsys.readouterr()
        assert train(cache, run, "train.steps=2", *overrides) == 2
        assert (run / "metrics.jsonl").read_bytes() == before
        assert (run / "config.yaml").read_bytes() == config
        return capsys.readouterr().err

    err = fails("train.resume=none")
    assert (
        "already holds a run (2 checkpoint folder(s) (step_0000002 .. step_0000004), "
        "metrics.jsonl (4 records))" in err
    )
    assert "train.resume=auto" in err and "train.resume=none train.overwrite=true" in err
    assert "train.overwrite" in fails("train.overwrite=true")  # needs train.resume=none
    for step in (2, 4):
        (step_dir(run, step) / META).unlink()
    err = fails()
    assert "meta.json' is missing" in err and "no checkpoint in it can be resumed" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "latest",
        "step_0000002",
        "step_0000004",
    ]

    assert train(cache, run, "train.steps=2", "train.resume=none", "train.overwrite=true") == 0
    assert [r["step"] for r in metrics(run)] == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000002"]


HOLD = """
import sys, time
from longctx.train.run_dir import RunLock
lock = RunLock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_one_writer_per_run_dir(tmp_path, cache, capsys, monkeypatch):
    run = tmp_path / "run"
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "job-1", "TORCHELASTIC_RESTART_COUNT": "0"}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run), "5"], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        locked_at = time.monotonic()
        capsys.readouterr()
        start = time.monotonic()
        assert train(cache, run, "train.steps=1") == 2
        assert time.monotonic() - start < 4
        err = capsys.readouterr().err
        assert f"is in use by pid {holder.pid} on host {os.uname().nodename!r}" in err, err
        assert not (run / "metrics.jsonl").exists() and not (run / "config.yaml").exists()
        # A torchrun restart of the same job waits for its previous attempt, then takes over.
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
        lock = RunLock.acquire(run)
        # It waited for the holder's 5 s (the holder drops the lock while exiting, so poll() may still
        # see it running for a moment on a busy machine).
        assert time.monotonic() - locked_at >= 4.9 and lock.same_lineage()
        holder.wait(timeout=60)
        lock.release()
    finally:
        holder.kill()
        holder.wait()
    # What a dead process left (its pid in the file, the lock gone with it) is taken over.
    assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    (run / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid}))
    lock = RunLock.acquire(run)
    assert lock.previous["pid"] == holder.pid
    lock.release()
    # Still locked but by a process that is gone (a child it forked kept the file open): taken over.
    import fcntl

    fd = os.open(run / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": os.uname().nodename, "pid": holder.pid}).encode(), 0)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    lock = RunLock.acquire(run)
    lock.release()
    os.close(fd)


def test_failed_save_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    """A real write failure mid-save: RLIMIT_FSIZE makes every write past half a loss.png fail
    (EFBIG), as a full disk fails a write part-way."""
    from longctx.train.engine import TorchEngine

    cfg = load_config(CONFIG, [f"train.run_dir={tmp_path}", *OVERRIDES])
    engine = TorchEngine(build_model(cfg.model), cfg, DistInfo())
    ckpt = Checkpointer(tmp_path, cfg, DistInfo())
    state = {"tokens": 0, "sampler": {}, "params": {}}
    ckpt.save(1, engine, state)
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 5.0 / s}) + "\n" for s in (1, 2))
    )
    plot_loss(tmp_path)
    picture = (tmp_path / "loss.png").read_bytes()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(picture) // 2, limits[1]))
    try:
        with pytest.raises(ValueError) as error:
            ckpt.save(2, engine, state)
        with pytest.raises(OSError):
            plot_loss(tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    message = str(error.value)
    assert "saving checkpoint step_0000002" in message, message
    assert "File too large" in message or "a write failed" in message, message
    assert "step_0000001 stays the latest checkpoint" in message and "\n" not in message
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001"]
    assert (root / "latest").read_text().strip() == "step_0000001"
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size == 0] == []
    assert (tmp_path / "loss.png").read_bytes() == picture and not (tmp_path / ".loss.png.tmp").exists()


def test_export_writes_a_fresh_folder(base_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("mine")
    capsys.readouterr()
    assert main(["export", "--run", str(base_run), "--out", str(out)]) == 2
    assert "is not empty (it holds config.json)" in capsys.readouterr().err
    assert (out / "config.json").read_text() == "mine"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["export", "--run", str(base_run), "--out", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["export", "--run", str(base_run), "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["n_layers"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]


def test_corpus_shorter_than_one_sample_is_an_error_unless_repeats_are_allowed(tmp_path):
    import numpy as np

    from longctx.data.indexed import TokenDocuments

    tokens = np.arange(20, dtype=np.int32)
    docs = TokenDocuments("tiny", tokens, np.array([0, 10]), np.array([10, 10]))
    with pytest.raises(
        ValueError, match=r"20 tokens.*seq_len \+ 1 = 65.*3\.2 times.*data\.allow_repeat=true"
    ):
        PackedSampler(docs, 64, 1, 0, allow_repeat=False)
    with pytest.warns(UserWarning, match=r"repeat it 3\.2 times"):
        sampler = PackedSampler(docs, 64, 1, 0, allow_repeat=True)
    assert sampler.next_batch().tokens.shape == (1, 65)
