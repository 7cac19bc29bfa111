"""Continue-training to a longer context: the length schedule, its resume, and the GPU configs run at
reduced size on CPU (pretrain, then continue from it with YaRN and a schedule)."""

import json
from pathlib import Path

import pytest

from longctx.cli import main
from longctx.config import ConfigError, load_config

BASE = ["train.wandb=false", "train.progress=false"]


def _losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_schedule_stages_and_errors():
    cfg = load_config("configs/tiny.yaml", ["data.seq_len_schedule=64x3,128x2"])
    assert cfg.data.stages() == [(0, 64), (3, 128), (5, 512)]
    assert load_config("configs/tiny.yaml").data.stages() == [(0, 512)]
    with pytest.raises(ConfigError, match=r"seq_len_schedule\[0\].*'LENxSTEPS'"):
        load_config("configs/tiny.yaml", ["data.seq_len_schedule=64-3"])
    with pytest.raises(ConfigError, match=r"seq_len_schedule\[1\].*exceeds data.seq_len=512"):
        load_config("configs/tiny.yaml", ["data.seq_len_schedule=64x3,1024x2"])
    # Each stage must split into 2 * cp chunks of whole blocks, like data.seq_len itself.
    with pytest.raises(ConfigError, match=r"seq_len_schedule\[0\]: 80 does not split"):
        load_config("configs/tiny.yaml", ["data.seq_len_schedule=80x3", "parallel.cp=2"])


def test_schedule_trains_each_length_and_resumes_mid_schedule(tmp_path):
    common = [*BASE, f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=128", "model.layers=DSNL"]
    schedule = "data.seq_len_schedule=32x2,64x2"
    full = tmp_path / "full"
    args = ["train", "--config", "configs/tiny.yaml", *common, schedule, "train.steps=6"]
    assert main([*args, f"train.run_dir={full}", "train.ckpt_every=1", "train.keep_last=10"]) == 0
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    # batch 2: 2 steps of 32 tokens, 2 of 64, then 2 of data.seq_len = 128.
    assert [r["tokens"] for r in records] == [64, 128, 256, 384, 640, 896]
    # Resumed inside a stage (3) or on a stage boundary (4: saved at 64 tokens, resumed at 128), the
    # run sees the samples (and losses) the whole run saw.
    for step in (3, 4):
        resumed = tmp_path / f"resumed{step}"
        ckpt = full / "checkpoints" / f"step_{step:07d}"
        assert main([*args, f"train.run_dir={resumed}", f"train.resume={ckpt}"]) == 0
        want, got = _losses(full), _losses(resumed)
        assert sorted(got) == list(range(step + 1, 7))
        for s in got:
            assert got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-6)


REDUCED = [
    "model.dim=64",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.mlp_hidden=128",
    "model.n_layers=8",
    "model.vocab_size=1024",
    "model.s2.block_size=16",
    "model.s2.local_blocks=2",
    "model.s2.vert_stride=4",
    "model.s2.dense_heads=1",
    "model.nsa.cmp_block=16",
    "model.nsa.cmp_stride=8",
    "model.nsa.slc_block=16",
    "model.nsa.slc_top=3",
    "model.nsa.window=32",
    "parallel.cp=1",
    "train.steps=2",
    "train.log_every=1",
    "train.eval_every=0",
    "train.async_ckpt=false",
    "data.val_fraction=0.05",
]


def test_gpu_configs_build_and_train_at_reduced_size(tmp_path, capsys):
    """configs/hybrid-1b-32k.yaml and its 128k continuation, shrunk to CPU size but otherwise as
    written (layer pattern, YaRN, schedule, activation checkpointing): each trains; the second starts
    from the first's weights."""
    common = [*BASE, *REDUCED, f"data.cache_dir={tmp_path / 'cache'}"]
    pre = tmp_path / "pre"
    cfg = load_config("configs/hybrid-1b-32k.yaml")
    assert cfg.model.pattern == "LSLNLSLD" * 3 and cfg.data.seq_len == 32768
    pre_args = ["train", "--config", "configs/hybrid-1b-32k.yaml", *common, "data.seq_len=256"]
    assert main([*pre_args, f"train.run_dir={pre}"]) == 0
    cont = tmp_path / "cont"
    cont_args = ["train", "--config", "configs/hybrid-1b-128k-continue.yaml", *common]
    extra = ["data.seq_len=512", "data.seq_len_schedule=256x1", "model.rope.scaling.original_max_len=256"]
    capsys.readouterr()
    assert main([*cont_args, *extra, f"train.init_from={pre}", f"train.run_dir={cont}"]) == 0
    out = capsys.readouterr().out
    assert f"initialised the weights from {pre / 'checkpoints' / 'step_0000002'}" in out
    assert "step 2: seq_len 512 (data.seq_len_schedule stage 2 of 2)" in out
    records = [json.loads(line) for line in (cont / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in records] == [256, 256 + 512]
    saved = load_config(cont / "config.yaml")
    assert saved.model.rope.scaling.type == "yarn" and saved.model.rope.scaling.factor == 4.0
