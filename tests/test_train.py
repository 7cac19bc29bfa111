import json
import subprocess
import sys

import pytest

from longctx.cli import main
from longctx.data import builtin_documents
from longctx.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "t.model"
    return Tokenizer(train_tokenizer(builtin_documents(), 1024, path))


def test_tokenizer_splits_digits_and_round_trips(tokenizer):
    text = "The pass key is 90417.\n    indented   line\twith tab"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    digits = tokenizer.encode("90417")
    assert [tokenizer.sp.id_to_piece(i) for i in digits][-5:] == list("90417")
    assert len(set(tokenizer.digit_ids())) == 10
    assert tokenizer.decode(tokenizer.encode("naïve ∑ café")) == "naïve ∑ café"  # byte fallback


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="smaller model.vocab_size"):
        train_tokenizer(["tiny corpus"] * 3, 100_000, tmp_path / "x.model")
    with pytest.raises(FileNotFoundError, match="longctx tokenizer train"):
        Tokenizer(tmp_path / "missing.model")


def test_train_run_loss_falls_and_run_dir_is_complete(tmp_path):
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--config",
            "configs/tiny.yaml",
            "model.layers=DSNL",
            "train.steps=30",
            f"train.run_dir={run}",
            "train.wandb=false",
            "train.progress=false",
        ]
    )
    assert code == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    for key in ("step", "loss", "lr", "tokens", "tokens_per_s", "comm_bytes"):
        assert key in records[-1]
    assert records[0]["loss"] - records[-1]["loss"] > 1.0
    assert records[-1]["tokens"] == 30 * 2 * 512
    for name in ("config.yaml", "tokenizer.model", "loss.png"):
        assert (run / name).is_file(), name


def test_train_is_deterministic(tmp_path):
    losses = []
    for name in ("a", "b"):
        main(
            [
                "train",
                "--config",
                "configs/tiny.yaml",
                "train.steps=3",
                f"train.run_dir={tmp_path / name}",
                "train.wandb=false",
                "train.progress=false",
            ]
        )
        losses.append(
            [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        )
    assert losses[0] == losses[1]


@pytest.mark.parametrize(
    "override,message",
    [("model.layrs=D", "did you mean 'model.layers'"), ("model.layers=DXL", "unknown mixer letter 'X'")],
)
def test_cli_config_errors_exit_nonzero(override, message, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "longctx",
            "train",
            "--config",
            "configs/tiny.yaml",
            override,
            f"train.run_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_console_script_and_tokenizer_command(tmp_path):
    out = tmp_path / "tok.model"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "longctx",
            "tokenizer",
            "train",
            "--config",
            "configs/tiny.yaml",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert Tokenizer(out).vocab_size == 1024
