"""`train.answer_loss_weight`: passkey answer digits weigh more in the objective, the reported loss
stays the plain mean, and the mask follows the targets under context parallelism."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longctx.cli import main
from longctx.config import ConfigError, load_config
from longctx.data import builtin_documents
from longctx.data.indexed import TokenDocuments
from longctx.data.sampler import PackedSampler, PasskeyMixture
from longctx.model.loss import linear_cross_entropy
from longctx.tokenizer import Tokenizer, train_tokenizer
from longctx.train.trainer import answer_weighted_loss
from tests.dist_utils import metrics, run_cli


def test_answer_weighted_loss_matches_brute_force():
    torch.manual_seed(0)
    hidden = torch.randn(2, 12, 8, requires_grad=True)
    weight = torch.randn(16, 8)
    logits = (hidden @ weight.t()).detach()  # [2, 12, 16]: what the chunked LM head never holds
    targets = torch.randint(0, 16, (2, 12))
    answers = torch.zeros(2, 12, dtype=torch.bool)
    answers[0, 9:] = True
    answers[1, 4:6] = True
    losses, correct = linear_cross_entropy(hidden, weight, targets, chunk=5)

    weighted, plain, (answer_sum, n_answers, right) = answer_weighted_loss(losses, correct, answers, 1.0)
    reference = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    assert weighted is plain and plain.item() == pytest.approx(reference.item(), rel=1e-6)

    weighted, plain, (answer_sum, n_answers, right) = answer_weighted_loss(losses, correct, answers, 4.0)
    per_token = F.cross_entropy(logits.double().flatten(0, 1), targets.flatten(), reduction="none")
    mask = answers.flatten().double()
    # fp32 sums of 24 terms of size ~3: a few ulps of the total.
    torch.testing.assert_close(weighted.double(), (per_token * (1 + 3 * mask)).sum(), rtol=1e-5, atol=0)
    torch.testing.assert_close(plain.double(), per_token.sum(), rtol=1e-5, atol=0)
    assert answer_sum.item() == pytest.approx((per_token * mask).sum().item(), rel=1e-5)
    assert n_answers.item() == 5
    assert right.item() == (logits.argmax(-1) == targets)[answers].sum().item()

    (grad,) = torch.autograd.grad(weighted, hidden, retain_graph=True)
    hidden64 = hidden.detach().double().requires_grad_()
    expected = F.cross_entropy(
        (hidden64 @ weight.double().t()).flatten(0, 1), targets.flatten(), reduction="none"
    )
    (expected_grad,) = torch.autograd.grad((expected * (1 + 3 * mask)).sum(), hidden64)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-7)
    # The answer positions' gradient is 4x the plain one, the others' unchanged.
    (plain_grad,) = torch.autograd.grad(plain, hidden)
    torch.testing.assert_close(grad[answers], 4 * plain_grad[answers])
    torch.testing.assert_close(grad[~answers], plain_grad[~answers])


def test_answer_mask_marks_the_answer_targets(tmp_path):
    tok = Tokenizer(train_tokenizer(builtin_documents(), 1024, tmp_path / "t.model"))
    ids = np.concatenate([tok.encode(t) + [tok.eos_id] for t in list(builtin_documents())[:10]])
    docs = TokenDocuments("builtin[:10]", ids.astype(np.int64), np.array([0]), np.array([len(ids)]))
    sampler = PackedSampler(docs, 96, 4, seed=0, passkey=PasskeyMixture(1.0, tok, 3))
    batch = sampler.next_batch()
    # The trainer's targets are tokens[:, 1:]; their mask is answer_mask[:, 1:].
    targets, answers = batch.tokens[:, 1:], batch.answer_mask[:, 1:]
    assert answers.sum(1).tolist() == [3] * 4
    digits = set(tok.digit_ids())
    assert all(t in digits for t in targets[answers].tolist())
    assert answers[:, -3:].all(), "the answer is the last three targets"


def test_answer_loss_weight_validated():
    with pytest.raises(ConfigError, match="train.answer_loss_weight"):
        load_config(None, ["train.answer_loss_weight=-1"])


def _records(tmp_path, name, *overrides) -> list[dict]:
    run = tmp_path / name
    code = main(
        [
            "train",
            "--config",
            "configs/tiny.yaml",
            "model.layers=DL",
            "data.seq_len=128",
            "data.passkey_fraction=1.0",
            "data.passkey_digits=3",
            "train.steps=3",
            f"train.run_dir={run}",
            "train.wandb=false",
            "train.progress=false",
            *overrides,
        ]
    )
    assert code == 0
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_weight_changes_the_update_not_the_reported_loss(tmp_path):
    plain = _records(tmp_path, "plain")
    weighted = _records(tmp_path, "weighted", "train.answer_loss_weight=8")
    # Step 1's loss is measured before any update: the same model, the same plain mean.
    assert weighted[0]["loss"] == plain[0]["loss"]
    assert weighted[0]["answer_loss"] == plain[0]["answer_loss"]
    # Later steps differ: the weight reached the gradient.
    assert weighted[2]["loss"] != plain[2]["loss"]
    for r in weighted:
        assert 0.0 <= r["answer_acc"] <= 1.0 and r["answer_loss"] > 0


@pytest.mark.slow
def test_answer_loss_under_context_parallelism_equals_one_process(tmp_path):
    common = [
        "train",
        "--config",
        "configs/tiny.yaml",
        "model.layers=D",
        "data.seq_len=128",
        "data.passkey_fraction=0.5",
        "data.passkey_digits=3",
        "train.answer_loss_weight=8",
        "train.steps=3",
        "train.wandb=false",
        "train.progress=false",
    ]
    # One process (this one) against two launched with torchrun.
    assert main([*common, f"train.run_dir={tmp_path / 'one'}"]) == 0
    proc = run_cli([*common, f"train.run_dir={tmp_path / 'cp2'}", "parallel.cp=2"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {name: metrics(tmp_path / name) for name in ("one", "cp2")}
    for one, cp in zip(runs["one"], runs["cp2"]):
        for key in ("loss", "answer_loss"):
            assert cp[key] == pytest.approx(one[key], rel=1e-4), key
        assert cp["answer_acc"] == one["answer_acc"]
