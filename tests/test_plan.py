"""`longctx plan`: its activation figures against the bytes autograd saves (the Triton kernels run in
the interpreter, as GPUs would run them), and the report for the shipped Llama-3 configs."""

import json
import os
import subprocess
import sys

import pytest

from longctx.cli import main
from longctx.config import load_config
from longctx.plan import GiB, layer_bytes_per_token, parse_bytes
from tests.dist_utils import REPO

SEQ_LEN = 64
CASES = [("D", "none"), ("S", "none"), ("N", "none"), ("L", "none"), ("D", "selective"),
         ("L", "full")]  # fmt: skip
MEASURE = """
import json, sys
from longctx.config import load_config
from longctx.plan import measure_block_bytes
cfg = load_config("configs/tiny.yaml", ["model.dim=64"]).model
print(json.dumps([measure_block_bytes(cfg, letter, {seq_len}, mode) for letter, mode in {cases}]))
"""


@pytest.fixture(scope="module")
def measured():
    """Saved bytes of one block per case, measured in a process where the kernels are Triton's."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "LONGCTX_KERNEL_BACKEND": "triton", "OMP_NUM_THREADS": "1"}
    code = MEASURE.format(seq_len=SEQ_LEN, cases=CASES)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(zip(CASES, json.loads(proc.stdout.splitlines()[-1])))


@pytest.mark.parametrize("case", CASES, ids=[f"{letter}-{mode}" for letter, mode in CASES])
def test_plan_activation_bytes_match_measured_saved_bytes(measured, case):
    letter, mode = case
    cfg = load_config("configs/tiny.yaml", ["model.dim=64"]).model
    planned = layer_bytes_per_token(cfg, letter, mode, act=4)["saved"] * SEQ_LEN
    assert abs(planned - measured[case]) <= 0.2 * measured[case], (planned, measured[case])
    # The tolerance tells dtypes apart: the bf16 figure is far from the fp32 measurement.
    bf16 = layer_bytes_per_token(cfg, letter, mode, act=2)["saved"] * SEQ_LEN
    assert abs(bf16 - measured[case]) > 0.2 * measured[case]


def test_plan_llama3_8b_on_8_gpus(capsys):
    assert (
        main(["plan", "--config", "configs/llama3-8b-128k.yaml", "--gpus", "8", "--gpu-memory", "80GiB"]) == 0
    )
    out = capsys.readouterr().out
    assert "8.03B parameters" in out and "seq_len 131072" in out and "cp 8 x dp 1" in out
    # FSDP over 8 GPUs: fp32 master weights 4 bytes x 8.03e9 / 8 = 3.74 GiB; AdamW twice that.
    assert "parameters (fp32 master)                             3.74 GiB" in out
    assert "optimizer state (AdamW, fp32)                        7.48 GiB" in out
    # Full checkpointing keeps one bf16 [16384, 4096] block input per layer: 32 x 128 MiB.
    assert "activations: 32 x D layers (full)                    4.00 GiB" in out
    assert "verdict: FITS" in out and "longest sequence that fits this setup" in out
    assert "suggestion: parallel.cp=" in out


def test_plan_says_when_nothing_fits(capsys):
    args = ["plan", "--config", "configs/llama3-70b-128k.yaml", "--gpus", "8", "--gpu-memory", "80GiB"]
    assert main(args) == 0
    out = capsys.readouterr().out
    # 70.55e9 parameters x 16 bytes / 8 GPUs is 131 GiB before any activation.
    assert "verdict: DOES NOT FIT" in out and "suggestion: nothing fits" in out
    assert main(["plan", "--config", "configs/tiny.yaml", "--gpus", "3", "parallel.cp=2"]) == 2
    assert "multiple of parallel.cp=2" in capsys.readouterr().err


def test_parse_bytes():
    assert (
        parse_bytes("80GiB") == 80 * GiB
        and parse_bytes("80GB") == 80 * 10**9
        and parse_bytes("141G") == 141e9
    )
    with pytest.raises(ValueError, match="is not a size"):
        parse_bytes("eighty")


def test_selective_frees_more_bytes_per_recompute_flop_than_every_kth_layer():
    from longctx.plan import measure_recompute

    cfg = load_config("configs/tiny.yaml", ["model.layers=D", "model.n_layers=2", "model.dim=64"]).model
    modes = [("none", 2), ("selective", 2), ("every_k", 2), ("every_k", 1), ("full", 2)]
    runs = {(m, k): measure_recompute(cfg, 128, m, k) for m, k in modes}
    none = runs["none", 2]

    def per_flop(key):
        return (none["saved"] - runs[key]["saved"]) / (runs[key]["flops"] - none["flops"])

    # k = 1 is full checkpointing; k = 2 recomputes half the layers, so half the extra FLOPs.
    assert runs["every_k", 1] == runs["full", 2]
    assert runs["every_k", 2]["flops"] - none["flops"] == (runs["full", 2]["flops"] - none["flops"]) // 2
    saved = [runs[key]["saved"] for key in [("full", 2), ("every_k", 2), ("selective", 2), ("none", 2)]]
    assert saved == sorted(saved) and len(set(saved)) == 4
    # Per byte freed, recomputing the MLP half costs fewer FLOPs than recomputing whole layers
    # (measured at 128 and 256 tokens in docs/scale.md).
    assert per_flop(("selective", 2)) > 1.02 * per_flop(("every_k", 2))


def test_plan_counts_every_kth_layer_layer_by_layer():
    from longctx.plan import Setup, _plan_config, breakdown

    cfg = _plan_config("configs/llama3-8b-128k.yaml", ["train.checkpoint_every_k=2"])
    counts = (1, 1, 1)  # parameter counts do not enter the activation lines

    def activations(mode):
        plan = breakdown(cfg, Setup(8, 80 * GiB, 131072, 8, 1, mode, False), counts)
        return plan[f"activations: 32 x D layers ({mode})"]

    # Layers 0, 2, ..., 30 keep their block input only, layers 1, 3, ..., 31 everything.
    assert activations("every_k") == pytest.approx((activations("full") + activations("none")) / 2)
    with pytest.raises(ValueError, match="train.checkpoint_every_k"):
        load_config(None, ["train.checkpoint_every_k=0"])
