"""The LM head and the next-token cross-entropy over token chunks: `[T, vocab]` logits are never whole.

    losses, correct = linear_cross_entropy(hidden, weight, targets, chunk=4096)
    # hidden [N, dim], weight [vocab, dim], targets [N] -> losses [N] fp32, correct [N] bool

The forward computes each chunk's logits `hidden[c] @ weight.T` in fp32, keeps only their log-sum-exp
and the per-token loss, and drops them; the backward recomputes each chunk's logits and turns them into
the gradient chunk by chunk: `softmax - onehot`, scaled by the incoming per-token gradient, times
`weight` for the hidden states and accumulated in fp32 into the weight's gradient. What is saved for the
backward is the inputs, the targets and one fp32 log-sum-exp per token, so the loss's memory is one
chunk's logits (about `chunk * vocab * 4` bytes, twice while the softmax is formed) instead of the
logits, their fp32 copy, the log-softmax and its gradient of the whole sequence.

Per-token losses let the caller weight tokens (passkey answers) and sum in fp32; `correct` is the
argmax hit of each token (for answer accuracy), computed from the same logits at no extra cost.
"""

import torch

# Tokens a chunk holds by default: its fp32 logits take about this many bytes.
CHUNK_BYTES = 256 * 2**20


def default_chunk(vocab_size: int) -> int:
    """Tokens per chunk so that a chunk's fp32 logits are about 256 MiB (`train.loss_chunk=0`)."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    # Under autocast the LM head runs in the autocast dtype, like nn.Linear would.
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, dtype):
        # hidden [N, dim]; the outputs are allocated in the targets' shape (not views of flat ones).
        out_shape, targets = targets.shape, targets.reshape(-1)
        n = hidden.shape[0]
        losses_out = torch.empty(out_shape, dtype=torch.float32, device=hidden.device)
        correct_out = torch.empty(out_shape, dtype=torch.bool, device=hidden.device)
        losses, correct = losses_out.view(-1), correct_out.view(-1)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        w = weight.to(dtype)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            logits = (hidden[start:end].to(dtype) @ w.t()).float()  # [n_chunk, vocab]
            target = targets[start:end, None]
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            losses[start:end] = lse[start:end] - logits.gather(1, target).squeeze(1)
            correct[start:end] = logits.argmax(-1) == targets[start:end]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        ctx.mark_non_differentiable(correct_out)
        return losses_out, correct_out

    @staticmethod
    def backward(ctx, grad_losses, _grad_correct):
        hidden, weight, targets, lse = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # fp32 sum over chunks, whatever the weight's dtype.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_losses = grad_losses.reshape(-1).float()
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            h = hidden[start:end].to(dtype)
            logits = (h @ w.t()).float()  # [n_chunk, vocab]
            # d loss_t / d logits_t = softmax_t - onehot(target_t), times the token's incoming gradient.
            grad = torch.exp(logits.sub_(lse[start:end, None]))
            grad.scatter_add_(1, targets[start:end, None], grad.new_full((end - start, 1), -1.0))
            grad.mul_(grad_losses[start:end, None])
            grad = grad.to(dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad @ w
            if ctx.needs_input_grad[1]:
                grad_weight += (grad.t() @ h).float()
        grad_weight = grad_weight.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy of the LM head `weight` over `hidden`, `chunk` tokens at a time.

    Args:
        hidden: `[..., dim]` final-norm hidden states.
        weight: `[vocab, dim]` LM head.
        targets: `[...]` int64 target ids.
        chunk: tokens per chunk; 0 picks `default_chunk(vocab)` (~256 MiB of fp32 logits).

    Returns:
        `(losses, correct)`, both shaped like `targets`: fp32 per-token losses (differentiable with
        respect to `hidden` and `weight`) and whether each token's argmax is its target.
    """
    if chunk < 0:
        raise ValueError(f"loss chunk must be >= 0 tokens (0: automatic), got {chunk}")
    chunk = chunk or default_chunk(weight.shape[0])
    return ChunkedLinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets, chunk, _compute_dtype(hidden)
    )


def liger_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    """Liger Kernel's fused linear cross-entropy (CUDA only): the summed loss, a 0-dim fp32 tensor.

    Liger computes the gradient inside its forward for a scalar loss, so it cannot weight single
    tokens; the trainer uses it only with `train.answer_loss_weight=1`.
    """
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as e:
        raise ImportError(
            "train.loss_impl=liger needs Liger Kernel on a CUDA machine: pip install 'longctx[gpu]' "
            "(or liger-kernel); train.loss_impl=chunked needs nothing extra"
        ) from e
    dtype = _compute_dtype(hidden)
    out = liger_fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]).to(dtype), weight.to(dtype), targets.reshape(-1), reduction="sum"
    )
    # Versions with z-loss support return (loss, z_loss).
    loss = out[0] if isinstance(out, tuple) else out
    return loss.float()
