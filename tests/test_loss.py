"""The chunked LM head + cross-entropy (longctx.model.loss): equal to the whole-logits loss in value and
gradient, never saving more than one chunk's logits, and the answer-weighted objective through it."""

import pytest
import torch
import torch.nn.functional as F

from longctx.config import load_config
from longctx.model import build_model
from longctx.model.loss import default_chunk, linear_cross_entropy
from longctx.train.trainer import answer_weighted_loss
from tests.conftest import rel_err


def reference_losses(hidden, weight, targets):
    """Per-token cross-entropy of the whole `[N, vocab]` logits."""
    return F.cross_entropy(hidden @ weight.t(), targets, reduction="none")


def saved_bytes(fn, exclude=()) -> int:
    """Bytes of the distinct storages autograd saves for the backward while `fn()` runs, leaving out
    the storages of `exclude` (inputs that exist anyway)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


@pytest.mark.parametrize("chunk", [1, 8, 64], ids=["chunk1", "chunk8", "chunk-whole"])
def test_linear_cross_entropy_matches_fp64_whole_logits(chunk):
    n, dim, vocab = 37, 16, 50
    hidden = torch.randn(n, dim, requires_grad=True)
    weight = (0.3 * torch.randn(vocab, dim)).requires_grad_()
    targets = torch.randint(0, vocab, (n,))
    # Any per-token weighting of the losses (the answer weight is one).
    token_weights = torch.rand(n) + 0.5

    losses, correct = linear_cross_entropy(hidden, weight, targets, chunk=chunk)
    (losses * token_weights).sum().backward()

    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = reference_losses(h64, w64, targets)
    (ref * token_weights.double()).sum().backward()
    h32, w32 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    unchunked = reference_losses(h32, w32, targets)
    (unchunked * token_weights).sum().backward()

    # The fp32 whole-logits loss is ~1e-7 off fp64; the chunked one must be as close.
    assert rel_err(losses.detach(), ref.detach()) < 1e-6
    assert rel_err(hidden.grad, h64.grad) < 1e-6
    assert rel_err(weight.grad, w64.grad) < 1e-6
    assert rel_err(hidden.grad, h32.grad) < 1e-6 and rel_err(weight.grad, w32.grad) < 1e-6
    assert torch.equal(correct, (h64 @ w64.t()).argmax(-1) == targets)
    # Fails when a chunk's gradient is wrong: a deliberately different target moves it.
    wrong = targets.clone()
    wrong[-1] = (wrong[-1] + 1) % vocab
    h_bad = hidden.detach().clone().requires_grad_()
    (linear_cross_entropy(h_bad, weight.detach(), wrong, chunk=chunk)[0] * token_weights).sum().backward()
    assert rel_err(h_bad.grad, h64.grad) > 1e-3


def test_linear_cross_entropy_saves_less_than_one_chunk_of_logits():
    n, dim, vocab, chunk = 256, 32, 512, 64
    hidden = torch.randn(2, n // 2, dim, requires_grad=True)
    weight = (0.1 * torch.randn(vocab, dim)).requires_grad_()
    targets = torch.randint(0, vocab, (2, n // 2))
    chunk_logits = chunk * vocab * 4

    chunked, (losses, _) = saved_bytes(
        lambda: linear_cross_entropy(hidden, weight, targets, chunk=chunk), exclude=(hidden, weight)
    )
    whole, _ = saved_bytes(
        lambda: reference_losses(hidden.flatten(0, 1), weight, targets.flatten()), exclude=(hidden, weight)
    )
    # Targets and one fp32 log-sum-exp per token: 12 bytes a token.
    assert chunked <= 12 * n < chunk_logits, chunked
    # The whole-logits loss saves at least the [N, vocab] logits (the check can fail).
    assert whole >= n * vocab * 4 > chunk_logits
    losses.sum().backward()
    assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape


def test_default_chunk_holds_256_mib_of_logits():
    assert default_chunk(128256) * 128256 * 4 <= 256 * 2**20 < (default_chunk(128256) + 1) * 128256 * 4
    assert default_chunk(1024) == 65536
    with pytest.raises(ValueError, match="loss chunk"):
        linear_cross_entropy(torch.zeros(2, 4), torch.zeros(8, 4), torch.zeros(2, dtype=torch.long), chunk=-1)


def test_model_loss_and_answer_weighting_match_brute_force():
    cfg = load_config("configs/tiny.yaml", ["model.layers=DL", "model.n_layers=2", "model.dim=32"])
    model = build_model(cfg.model)
    model.loss_chunk = 7
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24))
    targets = torch.randint(0, cfg.model.vocab_size, (2, 24))
    answers = torch.zeros(2, 24, dtype=torch.bool)
    answers[0, 20:] = True
    answers[1, 3:5] = True

    losses, correct = model(tokens, targets=targets)
    weighted, plain, (answer_sum, n_answers, right) = answer_weighted_loss(losses, correct, answers, 4.0)
    weighted.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}

    model.zero_grad()
    model.double()
    logits = model(tokens).flatten(0, 1)  # [B T, vocab]: the unchunked fp64 reference
    per_token = F.cross_entropy(logits, targets.flatten(), reduction="none")
    mask = answers.flatten().double()
    (per_token * (1 + 3 * mask)).sum().backward()
    assert plain.item() == pytest.approx(per_token.sum().item(), rel=1e-6)
    assert weighted.item() == pytest.approx((per_token * (1 + 3 * mask)).sum().item(), rel=1e-6)
    assert answer_sum.item() == pytest.approx((per_token * mask).sum().item(), rel=1e-6)
    assert n_answers.item() == 6
    assert right.item() == (logits.argmax(-1) == targets.flatten())[answers.flatten()].sum().item()
    for name, p in model.named_parameters():
        assert rel_err(grads[name], p.grad) < 1e-5, name

    # Weight 1: the plain loss itself.
    weighted, plain, _ = answer_weighted_loss(losses.detach(), correct, answers, 1.0)
    assert weighted is plain


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_liger_loss_equals_chunked_on_gpu():
    pytest.importorskip("liger_kernel")
    from longctx.model.loss import liger_linear_cross_entropy

    n, dim, vocab = 1000, 256, 32000
    hidden = torch.randn(n, dim, device="cuda", requires_grad=True)
    weight = (0.05 * torch.randn(vocab, dim, device="cuda")).requires_grad_()
    targets = torch.randint(0, vocab, (n,), device="cuda")
    liger = liger_linear_cross_entropy(hidden, weight, targets)
    liger.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    chunked = linear_cross_entropy(hidden, weight, targets, chunk=128)[0].sum()
    chunked.backward()
    assert liger.item() == pytest.approx(chunked.item(), rel=1e-4)
    assert rel_err(grads[0], hidden.grad) < 1e-4 and rel_err(grads[1], weight.grad) < 1e-4
