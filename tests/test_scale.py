"""Training at scale on one CPU process: gradient accumulation (derivation, errors, exact resume),
activation checkpointing modes and offload, and their saved-for-backward bytes."""

import pytest
import torch

from longctx.cli import main
from longctx.config import ConfigError, load_config
from longctx.model import build_model
from tests.dist_utils import metrics

COMMON = [
    "--config",
    "configs/tiny.yaml",
    "model.layers=D",
    "data.seq_len=128",
    "train.wandb=false",
    "train.progress=false",
]


def test_global_batch_tokens_sets_grad_accum_or_says_what_divides():
    cfg = load_config("configs/tiny.yaml", ["train.global_batch_tokens=4096", "data.seq_len=512"])
    # batch_size 2 x 512 tokens x 2 data-parallel ranks = 2048 tokens a micro-batch.
    assert cfg.train.accum_steps(512, dp_size=2) == 2
    assert cfg.train.accum_steps(512, dp_size=4) == 1
    with pytest.raises(ConfigError, match="not a whole number of micro-batches of 3072 tokens"):
        cfg.train.accum_steps(512, dp_size=3)
    cfg = load_config("configs/tiny.yaml", ["train.global_batch_tokens=4096", "train.grad_accum=3"])
    with pytest.raises(ConfigError, match="contradicts"):
        cfg.train.accum_steps(512, dp_size=1)
    with pytest.raises(ConfigError, match="train.grad_accum"):
        load_config(None, ["train.grad_accum=0"])
    assert load_config(None, ["train.activation_checkpointing=true"]).train.activation_checkpointing == "full"
    with pytest.raises(ConfigError, match="liger"):
        load_config(None, ["train.loss_impl=liger", "train.answer_loss_weight=4"])


def test_grad_accum_resumes_exactly_at_a_step_boundary(tmp_path, monkeypatch):
    accum = ["train.batch_size=1", "train.grad_accum=2", "data.passkey_fraction=0.5"]
    straight = tmp_path / "straight"
    assert main(["train", *COMMON, *accum, "train.steps=3", f"train.run_dir={straight}"]) == 0
    resumed = tmp_path / "resumed"
    assert main(["train", *COMMON, *accum, "train.steps=2", f"train.run_dir={resumed}"]) == 0
    assert main(["train", *COMMON, *accum, "train.steps=3", f"train.run_dir={resumed}"]) == 0
    a, b = metrics(straight), metrics(resumed)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["tokens"] for r in b] == [256 * k for k in (1, 2, 3)]
    # The same sequences as one batch of 2: the sampler advanced by every micro-batch.
    large = tmp_path / "large"
    assert main(["train", *COMMON, "train.batch_size=2", "data.passkey_fraction=0.5", "train.steps=3",
                 f"train.run_dir={large}"]) == 0  # fmt: skip
    assert [r["loss"] for r in metrics(large)] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert [r["answer_acc"] for r in metrics(large)] == [r["answer_acc"] for r in a]


def saved_bytes_per_layer(model, tokens) -> int:
    """Bytes of distinct storages autograd keeps for the backward of the layer stack, per layer
    (the embedding, final norm and loss excluded by differencing two depths)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens, return_hidden=True)
    out.sum().backward()
    return sum(storages.values())


@pytest.mark.parametrize("letter", ["D", "L"])
def test_checkpointing_modes_same_gradients_and_fewer_saved_bytes(letter):
    cfg = load_config("configs/tiny.yaml", [f"model.layers={letter}", "model.n_layers=2", "model.dim=64"])
    model = build_model(cfg.model)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, 64))
    targets = torch.randint(0, cfg.model.vocab_size, (1, 64))
    grads, saved = {}, {}
    model.checkpoint_every_k = 2  # every_k: the first of the 2 layers recomputed, the second kept
    for mode in ("none", "selective", "every_k", "full"):
        for offload in (False, True):
            model.zero_grad()
            model.activation_checkpointing, model.activation_offload = mode, offload
            model(tokens, targets=targets)[0].sum().backward()
            grads[mode, offload] = [p.grad.clone() for p in model.parameters()]
        model.activation_offload = False
        saved[mode] = saved_bytes_per_layer(model, tokens)
    for key, value in grads.items():
        assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(value, grads["none", False])), key
    assert saved["full"] < saved["selective"] < saved["none"], saved
    assert saved["full"] < saved["every_k"] < saved["none"], saved
