"""The G mixer (Gated DeltaNet layer) in one process: decoding steps equal the chunked forward, the
decay init spans short to long memory, and a G model trains (reference backend, no interpreter)."""

import torch

from longctx.config import load_config
from longctx.model import build_model
from tests.conftest import rel_err

SMALL = ["model.vocab_size=64", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2", "data.seq_len=64"]


def small_mixer():
    model = build_model(load_config(None, [*SMALL, "model.n_layers=1", "model.layers=G"]).model).double()
    return model.layers[0].mixer


def test_gated_delta_mixer_steps_equal_the_chunked_forward():
    """Token-by-token decoding (state plus the 3-token convolution window) from an empty cache and
    from a prefill gives the chunked forward's outputs (fp64, so only rounding differs)."""
    mixer = small_mixer()
    with torch.no_grad():  # the convolutions start near-random; make the window matter anyway
        for conv in (mixer.q_conv, mixer.k_conv, mixer.v_conv):
            conv.weight.normal_()
    x = torch.randn(2, 37, 32, dtype=torch.float64)
    from longctx.parallel import SeqLayout

    whole = mixer(x, None, None, SeqLayout.full(37))
    cache, steps = None, []
    for t in range(37):
        y, cache = mixer.step(x[:, t], cache)
        steps.append(y)
    assert rel_err(torch.stack(steps, 1).detach(), whole.detach()) < 1e-12
    prefix, cache = mixer.prefill(x[:, :30])
    assert rel_err(prefix, whole[:, :30]) < 1e-12
    for t in range(30, 37):
        y, cache = mixer.step(x[:, t], cache)
        assert rel_err(y, whole[:, t]) < 1e-12
    # The check can fail: a window missing one token changes the next output.
    window, state = mixer.prefill(x[:, :30])[1]
    y, _ = mixer.step(x[:, 30], (torch.zeros_like(window), state))
    assert rel_err(y, whole[:, 30]) > 1e-6


def test_gated_delta_mixer_decay_init_spans_short_to_long_memory():
    mixer = small_mixer()
    x = torch.zeros(1, 1, 32, dtype=torch.float64)
    _, g, beta = mixer.gates(x)
    rate = -g.flatten()  # per-token log-decay of each head at zero input
    assert torch.all(rate[1:] > rate[:-1])
    assert abs(rate[0].item() - 1e-3) < 1e-6 and abs(rate[-1].item() - 1.6) < 1e-6
    assert torch.allclose(beta, torch.full_like(beta, 0.5))


def test_gated_delta_model_loss_falls():
    """A two-layer GD model fits a fixed batch (the reference backend, autograd through the chunked form)."""
    torch.manual_seed(0)
    model = build_model(load_config(None, [*SMALL, "model.n_layers=2", "model.layers=GD"]).model)
    tokens = torch.randint(0, 64, (2, 40))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


TOL_DOCS = 1e-10
# Packed rows of 37 tokens; row 0 has a document shorter than the convolution window (2 tokens).
DOC_LENGTHS = [[5, 2, 13, 17], [20, 17]]


def packed_layout(lengths, t):
    from longctx.parallel import SeqLayout
    from longctx.parallel.layout import Documents

    cu = torch.full((len(lengths), max(map(len, lengths)) + 1), t, dtype=torch.int32)
    for row, docs in enumerate(lengths):
        cu[row, : len(docs)] = torch.tensor([sum(docs[:i]) for i in range(len(docs))], dtype=torch.int32)
    return SeqLayout.full(t).with_docs(Documents(cu))


def test_gated_delta_mixer_documents_match_each_document_alone():
    """With packed documents the G layer (state and convolution window) equals each document run on
    its own, outputs and input gradients (fp64; the -1e4 log-decay of a start token costs a few
    1e-12 of rounding in the chunk's summed decays); stepping token by token with a reset at each start,
    and stepping on from a packed prefill, gives the same outputs."""
    from longctx.parallel import SeqLayout

    mixer = small_mixer()
    with torch.no_grad():
        for conv in (mixer.q_conv, mixer.k_conv, mixer.v_conv):
            conv.weight.normal_()
    x = torch.randn(2, 37, 32, dtype=torch.float64, requires_grad=True)
    do = torch.randn(2, 37, 32, dtype=torch.float64)
    layout = packed_layout(DOC_LENGTHS, 37)
    packed = mixer(x, None, None, layout)
    (dx,) = torch.autograd.grad((packed * do).sum(), x)
    for row, docs in enumerate(DOC_LENGTHS):
        for start, n in ((sum(docs[:i]), docs[i]) for i in range(len(docs))):
            part = x[row : row + 1, start : start + n].detach().requires_grad_()
            alone = mixer(part, None, None, SeqLayout.full(n))
            (d_part,) = torch.autograd.grad((alone * do[row : row + 1, start : start + n]).sum(), part)
            assert rel_err(packed[row, start : start + n].detach(), alone[0].detach()) < TOL_DOCS
            assert rel_err(dx[row, start : start + n], d_part[0]) < TOL_DOCS
    starts = torch.zeros(2, 37, dtype=torch.bool)
    for row, docs in enumerate(DOC_LENGTHS):
        starts[row, [sum(docs[:i]) for i in range(len(docs))]] = True
    with torch.no_grad():
        cache, steps = None, []
        for t in range(37):
            y, cache = mixer.step(x[:, t], cache, reset=starts[:, t])
            steps.append(y)
        assert rel_err(torch.stack(steps, 1), packed.detach()) < TOL_DOCS
        # Prefill the first 23 tokens (row 0 ends 3 tokens into a document, row 1 mid-document).
        prefix, cache = mixer.prefill(x[:, :23], packed_layout([[5, 2, 13, 3], [20, 3]], 23))
        assert rel_err(prefix, packed[:, :23].detach()) < TOL_DOCS
        for t in range(23, 37):
            y, cache = mixer.step(x[:, t], cache, reset=starts[:, t])
            assert rel_err(y, packed[:, t].detach()) < TOL_DOCS
    # The check can fail: without the layout's documents the rows differ.
    assert rel_err(mixer(x, None, None, SeqLayout.full(37)).detach(), packed.detach()) > 1e-3
