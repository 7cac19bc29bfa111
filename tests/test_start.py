"""How a run starts (`longctx.train.start.plan_start`): fresh, resumed, or initialised from other weights,
and when a DeepSpeed checkpoint needs the universal format. The runs that carry these out are
tests/test_checkpoint.py's (resume at another degree, init_from) and tests/test_hf.py's."""

import json

import pytest

from longctx.config import load_config
from longctx.train.checkpoint import FORMAT_VERSION
from longctx.train.start import needs_universal, plan_start


def config(tmp_path, *overrides):
    return load_config("configs/tiny.yaml", [f"train.run_dir={tmp_path}", *overrides])


def write_checkpoint(run_dir, step, **meta):
    """A complete checkpoint as far as finding and verifying it goes (meta.json lists no files)."""
    path = run_dir / "checkpoints" / f"step_{step:07d}"
    path.mkdir(parents=True)
    meta = {"format": FORMAT_VERSION, "step": step, "engine": "deepspeed", "dp_size": 2, "cp_size": 1,
            "zero_stage": 1, "files": {}, **meta}  # fmt: skip
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_plan_start_fresh_init_and_resume(tmp_path):
    fresh = plan_start(config(tmp_path), tmp_path, world_size=1)
    assert (fresh.kind, fresh.resume_from, fresh.init_from, fresh.universal) == ("fresh", None, None, False)

    init = plan_start(config(tmp_path, "train.init_from=runs/other", "parallel.fsdp=true"), tmp_path, 1)
    # Under FSDP2 every init_from source is read per shard, after the engine is built.
    assert (init.kind, init.init_from, init.on_meta, init.init_sharded) == (
        "init",
        "runs/other",
        True,
        True,
    )
    hf = plan_start(
        config(tmp_path, "train.init_from=hf:/x", "parallel.fsdp=true", "model.layers=D"), tmp_path, 1
    )
    assert (hf.kind, hf.on_meta, hf.init_sharded) == ("init", True, True)
    converted = config(tmp_path, "train.init_from=hf:/x", "parallel.fsdp=true", "model.layers=DL")
    assert plan_start(converted, tmp_path, 1).init_sharded
    plain = plan_start(config(tmp_path, "train.init_from=runs/other"), tmp_path, 1)
    assert (plain.on_meta, plain.init_sharded) == (False, False)

    ckpt = write_checkpoint(tmp_path, 4)
    ds = config(tmp_path, "parallel.engine=deepspeed", "train.init_from=runs/other")
    resume = plan_start(ds, tmp_path, world_size=2)
    # A resumed run ignores init_from; the same DP x CP degree loads DeepSpeed's own checkpoint.
    assert (resume.kind, resume.resume_from, resume.init_from, resume.universal) == (
        "resume",
        ckpt,
        None,
        False,
    )
    assert plan_start(ds, tmp_path, world_size=1).universal
    with pytest.raises(ValueError, match="train.run_dir"):
        plan_start(config(tmp_path, "train.resume=none"), tmp_path, 1)


@pytest.mark.parametrize(
    "engine, world, zero, expected",
    [
        ("deepspeed", 2, 1, False),
        ("deepspeed", 4, 1, True),
        ("deepspeed", 2, 3, True),
        ("torch", 4, 1, False),
    ],
    ids=["same-degree", "other-degree", "zero3", "torch-engine"],
)
def test_needs_universal(tmp_path, engine, world, zero, expected):
    meta = {"engine": "deepspeed", "dp_size": 2, "cp_size": 1, "zero_stage": 1}
    cfg = config(tmp_path, f"parallel.engine={engine}", f"parallel.zero_stage={zero}")
    assert needs_universal(meta, cfg, world) == expected
