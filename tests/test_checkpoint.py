"""Checkpoint and resume: exact resumption under both engines at cp=2, resharding to one process, a
worker killed mid-run carrying on under torchrun, atomic saves, pruning, export, safe loading, errors.

Runs are shared between tests through the module-scoped `runs` fixture (each torchrun launch costs
about 15 s of imports on a CPU). Every run uses `train.warmup=4`, so a 4-step run and an 8-step run
share the LR of their first four steps (the cosine after warm-up depends on `train.steps`).
"""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from longctx.cli import main
from longctx.config import load_config
from longctx.export import load_exported
from longctx.model import build_model
from longctx.train.checkpoint import (
    Checkpointer,
    checkpoint_files,
    full_weights,
    latest_checkpoint,
    list_checkpoints,
    read_meta,
)
from longctx.train.checkpoint_io import dcp_tensor_shapes, weights_only_torch_load
from longctx.train.distributed import DistInfo
from tests.dist_utils import free_port, losses, metrics, run_cli, run_many

# The acceptance model: a dense and a gated linear layer, both context-parallel.
LAYERS = "DL"
ENGINES = ["torch", "deepspeed"]
CONFIG = "configs/tiny.yaml"
OVERRIDES = [
    f"model.layers={LAYERS}",
    "train.wandb=false",
    "train.progress=false",
    "train.warmup=4",
    "train.batch_size=1",
    "data.seq_len=256",
]
BASE = ["--config", CONFIG, *OVERRIDES]


class Runs:
    """Training runs made on first use and shared by the tests of this module."""

    def __init__(self, root: Path):
        self.root = root
        self.cache = root / "cache"
        self.made = {}

    def once(self, key, make):
        if key not in self.made:
            self.made[key] = make()
        return self.made[key]

    def train(self, name: str, *overrides, nproc: int = 1, torchrun_args=(), kill_at=None, in_process=False):
        """Train run `name`; `kill_at=(step, rank)` kills that rank as that step begins, once
        (tests/kill_at_step.py)."""
        run_dir = self.root / name
        args = ["train", *BASE, f"data.cache_dir={self.cache}", f"train.run_dir={run_dir}", *overrides]
        if in_process:
            assert main(args) == 0
        else:
            module = "longctx"
            if kill_at is not None:
                module, args = "tests.kill_at_step", [*map(str, kill_at), *args]
            proc = run_cli(args, nproc=nproc, torchrun_args=list(torchrun_args), module=module)
            assert proc.returncode == 0, proc.stderr[-4000:]
        return run_dir

    def first_halves(self) -> None:
        """One torchrun launch (tests/cp_runs.py) for both engines' 8-step straight runs and the first
        4 steps of the runs that resume: a launch costs each process seconds of imports."""

        def make():
            batch = []
            for engine in ENGINES:
                common = [
                    *OVERRIDES,
                    f"data.cache_dir={self.cache}",
                    "parallel.cp=2",
                    f"parallel.engine={engine}",
                ]
                batch.append((self.root / f"straight-{engine}", [*common, "train.steps=8"], CONFIG))
                batch.append((self.root / f"resumed-{engine}", [*common, "train.steps=4"], CONFIG))
            run_many(batch, 2, self.root)

        self.once("first halves", make)

    def straight(self, engine: str) -> Path:
        self.first_halves()
        return self.root / f"straight-{engine}"

    def resumed(self, engine: str) -> Path:
        def make():
            self.first_halves()
            # A fresh launch, as a real resume is: new processes whose trainers find each run's step-4
            # checkpoint on disk. Both engines resume in that one launch.
            batch = []
            for name in ENGINES:
                args = [*OVERRIDES, f"data.cache_dir={self.cache}", "parallel.cp=2"]
                args += [f"parallel.engine={name}", "train.steps=8", "train.resume=auto"]
                batch.append((self.root / f"resumed-{name}", args, CONFIG))
            run_many(batch, 2, self.root)

        self.once("resumed", make)
        return self.root / f"resumed-{engine}"

    def checkpoint(self, engine: str, step: int) -> Path:
        return self.resumed(engine) / "checkpoints" / f"step_{step:07d}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # In-process runs share 2 busy cores with torchrun launches and other jobs: two torch threads
    # there run several times slower than one (the launched runs get OMP_NUM_THREADS=1 the same way).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("ckpt"))


def assert_exact(a, b, atol=1e-6):
    assert len(a) == len(b) and all(abs(x - y) <= atol for x, y in zip(a, b)), (a, b)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_resume_at_cp2_reproduces_the_straight_run(runs, engine):
    straight, resumed = losses(runs.straight(engine)), losses(runs.resumed(engine))
    assert len(straight) == 8
    assert_exact(resumed[4:], straight[4:])
    # metrics.jsonl of the resumed run reads like one run: steps 1-8 once each.
    assert [r["step"] for r in metrics(runs.resumed(engine))] == list(range(1, 9))
    assert metrics(runs.resumed(engine))[-1]["tokens"] == metrics(runs.straight(engine))[-1]["tokens"]
    meta = read_meta(runs.checkpoint(engine, 4))
    assert meta["step"] == 4 and meta["cp_size"] == 2 and meta["sampler"]["position"] == 4
    assert sorted(p.name for p in (runs.checkpoint(engine, 4) / "rng").iterdir()) == [
        "rank_00000.json",
        "rank_00001.json",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_checkpoint_from_cp2_resumes_in_one_process(runs, engine, tmp_path):
    # One process, no process group: DCP reads both ranks' files; DeepSpeed goes through its universal
    # checkpoint (converted next to the original).
    source = tmp_path / "source"
    shutil.copytree(runs.checkpoint(engine, 4), source)
    # The torch engine's run in this process (no launch); DeepSpeed's in a process of its own, as it
    # makes a process group of one, which this test process must not keep.
    args = ["train.steps=5", f"train.resume={source}", f"parallel.engine={engine}"]
    run = runs.train(f"one-{engine}", *args, in_process=engine == "torch")
    step5 = metrics(run)[0]
    assert step5["step"] == 5
    # Summation order differs between cp=2 and one process; the state is the same.
    assert abs(step5["loss"] - losses(runs.straight(engine))[4]) <= 1e-4 * abs(step5["loss"])
    if engine == "deepspeed":
        assert (source / "deepspeed_universal").is_dir()


@pytest.mark.slow
def test_killed_worker_restarts_and_the_run_carries_on(runs):
    run = runs.train(
        "killed",
        "train.steps=8",
        "parallel.cp=2",
        "train.ckpt_every=2",
        nproc=2,
        torchrun_args=["--master-port", str(free_port()), "--max-restarts", "1"],
        kill_at=(6, 1),
    )
    # Rank 1 killed itself as step 6 began, and the restart resumed from step 4.
    assert (run / ".test-killed").is_file()
    assert [r["step"] for r in metrics(run)] == list(range(1, 9))
    assert_exact(losses(run), losses(runs.straight("torch")))
    assert [p.name for p in list_checkpoints(run)] == ["step_0000006", "step_0000008"]


def tiny_engine(tmp_path, *overrides):
    from longctx.train.engine import TorchEngine

    cfg = load_config("configs/tiny.yaml", [f"train.run_dir={tmp_path}", "model.layers=D", *overrides])
    model = build_model(cfg.model)
    return cfg, TorchEngine(model, cfg, DistInfo())


def test_atomic_save_keeps_the_previous_checkpoint_on_failure_and_prunes(tmp_path):
    cfg, engine = tiny_engine(tmp_path, "train.keep_last=2")
    ckpt = Checkpointer(tmp_path, cfg, DistInfo())
    state = {"tokens": 0, "sampler": {}, "params": {}}
    for step in (1, 2, 3):
        ckpt.save(step, engine, state)
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000002", "step_0000003"]
    assert (root / "latest").read_text().strip() == "step_0000003"

    # A save that dies mid-way (disk full) is one error, and leaves nothing of itself behind.
    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    save = engine.save_checkpoint
    engine.save_checkpoint = fail
    with pytest.raises(ValueError, match="No space left on device.*step_0000003 stays the latest checkpoint"):
        ckpt.save(4, engine, state)
    engine.save_checkpoint = save
    assert not (root / ".step_0000004.tmp").exists()
    assert (root / "latest").read_text().strip() == "step_0000003"
    assert latest_checkpoint(tmp_path) == root / "step_0000003"
    # A killed save leaves its temporary directory, which the next save removes.
    (root / ".step_0000004.tmp" / "state").mkdir(parents=True)

    # A step directory without its completion marker (meta.json) is never picked, not even via latest.
    (root / "step_0000009" / "state").mkdir(parents=True)
    assert latest_checkpoint(tmp_path) == root / "step_0000003"
    (root / "latest").write_text("step_0000009\n")
    assert latest_checkpoint(tmp_path) == root / "step_0000003"

    # The next good save replaces latest and removes the stale temporary directory.
    ckpt.save(5, engine, state)
    assert not (root / ".step_0000004.tmp").exists()
    assert (root / "latest").read_text().strip() == "step_0000005"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000003", "step_0000005"]


def test_async_save_resumes_exactly(runs):
    straight = runs.train("async-straight", "train.steps=6", in_process=True)
    # Each checkpoint is written on a background thread while the next steps change the weights, so
    # the save must have staged a copy; step 3's is then resumed from in a new run.
    saver = runs.train(
        "async-saver",
        "train.steps=6",
        "train.async_ckpt=true",
        "train.ckpt_every=1",
        "train.keep_last=0",
        in_process=True,
    )
    assert len(list_checkpoints(saver)) == 6
    step3 = saver / "checkpoints" / "step_0000003"
    resumed = runs.train("async-resumed", "train.steps=6", f"train.resume={step3}", in_process=True)
    assert [r["step"] for r in metrics(resumed)] == [4, 5, 6]
    assert_exact(losses(resumed), losses(straight)[3:], atol=0)
    # The comparison can fail: a checkpoint whose data-loader position is one sample off resumes wrong.
    shifted = runs.root / "shifted" / "step_0000003"
    shutil.copytree(step3, shifted)
    meta = json.loads((shifted / "meta.json").read_text())
    meta["sampler"]["position"] += 1
    (shifted / "meta.json").write_text(json.dumps(meta))
    wrong = runs.train("async-shifted", "train.steps=4", f"train.resume={shifted}", in_process=True)
    assert abs(losses(wrong)[0] - losses(straight)[3]) > 1e-3


def test_resume_errors_name_the_parameter_or_the_file(runs, tmp_path, capsys):
    source = runs.train("small", "train.steps=1", in_process=True)
    ckpt = source / "checkpoints" / "step_0000001"

    def fails(*overrides):
        capsys.readouterr()
        args = ["train", *BASE, f"data.cache_dir={runs.cache}", f"train.run_dir={tmp_path / 'x'}", *overrides]
        assert main(args) == 2
        return capsys.readouterr().err

    err = fails(f"train.resume={ckpt}", "model.dim=64")
    assert "longctx: error:" in err
    assert "parameter 'tok_embeddings.weight' has shape [1024, 128] in the checkpoint but [1024, 64]" in err
    err = fails(f"train.resume={tmp_path / 'nowhere'}")
    assert f"'{tmp_path / 'nowhere'}' does not exist" in err
    err = fails(f"train.init_from={tmp_path}")
    assert "train.init_from" in err and "is not a checkpoint" in err

    broken = tmp_path / "broken" / "step_0000001"
    shutil.copytree(ckpt, broken)
    (broken / "meta.json").write_text("{not json")
    assert f"'{broken / 'meta.json'}' is not valid JSON" in fails(f"train.resume={broken}")
    shutil.copy(ckpt / "meta.json", broken / "meta.json")
    (broken / "state" / "__0_0.distcp").unlink()
    assert f"checkpoint file '{broken / 'state' / '__0_0.distcp'}' is missing" in fails(
        f"train.resume={broken}"
    )
    (broken / "meta.json").unlink()
    assert "is incomplete (no meta.json" in fails(f"train.resume={broken}")


def test_init_from_loads_weights_only_with_a_longer_context_and_rope_scaling(runs, tmp_path):
    from longctx.train.trainer import Trainer

    source = runs.checkpoint("torch", 8)
    cfg = load_config(
        "configs/tiny.yaml",
        [
            f"model.layers={LAYERS}",
            "train.wandb=false",
            "train.progress=false",
            f"data.cache_dir={runs.cache}",
            f"train.run_dir={tmp_path / 'longer'}",
            "data.seq_len=512",
            "model.rope.scaling.type=yarn",
            "model.rope.scaling.factor=2",
            "model.rope.scaling.original_max_len=256",
            f"train.init_from={source.parent.parent}",
        ],
    )
    trainer = Trainer(cfg)
    try:
        weights = full_weights(source)
        assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in weights.items())
        # Weights only: the optimizer, schedule and data start fresh.
        assert trainer.step == 0 and trainer.sampler.position == 0 and not trainer.engine.optimizer.state
    finally:
        trainer.close()


@pytest.mark.slow
def test_export_round_trip_gives_the_same_logits(runs, tmp_path):
    out = tmp_path / "exported"
    assert main(["export", "--run", str(runs.resumed("torch")), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and json.loads((out / "config.json").read_text())[
        "dim"
    ] == 128
    exported = load_exported(out)
    cfg = load_config("configs/tiny.yaml", [f"model.layers={LAYERS}"])
    model = build_model(cfg.model)
    model.load_state_dict(full_weights(runs.checkpoint("torch", 8)))
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 96))
    with torch.no_grad():
        assert torch.equal(exported(tokens), model(tokens))
    # DeepSpeed's checkpoint exports too (consolidated fp32 weights), and its run trained the same model.
    ds_out = tmp_path / "exported-ds"
    ds_ckpt = "step_0000008"
    assert (
        main(
            ["export", "--run", str(runs.resumed("deepspeed")), "--checkpoint", ds_ckpt, "--out", str(ds_out)]
        )
        == 0
    )
    # Two separate 8-step runs: the engines sum gradients in different orders and Adam amplifies that
    # fp32 noise (their losses agree to 1e-4, test_distributed), so their logits agree only roughly.
    with torch.no_grad():
        ds_logits, torch_logits = load_exported(ds_out)(tokens), model(tokens)
    err = float((ds_logits - torch_logits).norm() / torch_logits.norm())
    print(f"deepspeed vs torch export: relative error {err:.2e}")
    assert err < 1e-3


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_loading_refuses_pickled_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    (state / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(ValueError, match="cannot be loaded safely: it names posix.system"):
        dcp_tensor_shapes(state)
    evil = tmp_path / "evil.pt"
    torch.save({"x": _RunsCode()}, evil)
    with weights_only_torch_load(), pytest.raises(ValueError, match="cannot be loaded safely"):
        torch.load(evil, weights_only=False)
    assert not (tmp_path / "pwned").exists()
    # The guard is what stopped it: a plain unpickler runs the payload.
    pickle.loads((state / ".metadata").read_bytes())
    assert (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_crafted_deepspeed_file_is_refused_by_export_and_init_from(runs, tmp_path, monkeypatch, capsys):
    # A DeepSpeed checkpoint whose model-states file pickles a call (meta.json's checksums updated, so
    # the loader is what refuses it).
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "step_0000008"
    shutil.copytree(runs.checkpoint("deepspeed", 8), ckpt)
    evil = ckpt / "deepspeed" / "mp_rank_00_model_states.pt"
    torch.save({"module": _RunsCode()}, evil)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"] = checkpoint_files(ckpt)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint file '{evil}' cannot be loaded safely: it holds posix.system" in err, err
    assert "weights_only` set to `False`" not in err
    config = Path(__file__).resolve().parent.parent / CONFIG
    args = ["train", "--config", str(config), *OVERRIDES, f"data.cache_dir={runs.cache}"]
    assert main([*args, f"train.run_dir={tmp_path / 'x'}", f"train.init_from={ckpt}"]) == 2
    assert f"'{evil}' cannot be loaded safely" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()
