"""Generation with per-mixer caches: decoding equals the full forward pass, sampling, memory, the CLI."""

import pytest
import torch

import longctx
from longctx.config import ModelConfig, NSAConfig, RopeConfig, RopeScalingConfig, S2Config
from longctx.generation import sample_next
from longctx.model import build_model
from longctx.model.decoding import ModelCache, decode_step, prefill
from tests.conftest import rel_err


def tiny(layers: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    # Blocks of 8 tokens, so a 21-token prompt and 30 new tokens cross several of every kind; slc_top 5
    # leaves two N selection slots to the importance ranking (three are forced).
    cfg = ModelConfig(
        vocab_size=128,
        dim=32,
        n_layers=len(layers),
        n_heads=4,
        n_kv_heads=2,
        layers=layers,
        s2=S2Config(block_size=8, local_blocks=2, vert_stride=3),
        nsa=NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, slc_top=5, window=8),
        **kwargs,
    )
    torch.manual_seed(seed)
    return build_model(cfg).eval()


YARN = RopeConfig(scaling=RopeScalingConfig(type="yarn", factor=2.0, original_max_len=32))
CASES = {
    "D": dict(layers="D"),
    "D-window6": dict(layers="D", dense_window=6),
    "S": dict(layers="S"),
    "N": dict(layers="N"),
    "L": dict(layers="L"),
    "G": dict(layers="G"),
    "DSNL-yarn": dict(layers="DSNLLD", rope=YARN),
    "GD": dict(layers="GGD"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_greedy_decoding_logits_equal_the_full_forward(case):
    model = tiny(**CASES[case])
    prompt = torch.randint(0, 128, (2, 21))
    out = longctx.generate(model, prompt, max_new_tokens=30, return_logits=True)
    assert out.tokens.shape == (2, 51) and torch.equal(out.tokens[:, :21], prompt)
    with torch.no_grad():
        full = model(out.tokens[:, :-1])[:, 20:]  # the logits that predicted each new token
    assert rel_err(out.logits, full) < 1e-5
    # Greedy: each new token is its step's argmax.
    assert torch.equal(out.new_tokens, full.argmax(-1))


def test_decoding_with_a_wrong_cache_rule_is_caught(monkeypatch):
    """The exactness check has teeth: S attending every block, or N keeping only its three forced
    selection blocks (dropping the two ranked by importance), drifts far from the forward pass."""
    import torch.nn.functional as F

    from longctx.model import decoding

    def dense_plan(cfg, n_heads, block, device):
        tokens = torch.arange((block + 1) * cfg.block_size).expand(n_heads, -1)
        return tokens, torch.ones_like(tokens, dtype=torch.bool)

    select = decoding.nsa_select_blocks

    def forced_only(*args, **kwargs):
        return F.pad(select(*args[:6], 3, **kwargs), (0, 2), value=-1)

    prompt = torch.randint(0, 128, (1, 40))
    for letter, name, wrong in (
        ("S", "S2Decoder._plan", dense_plan),
        ("N", "nsa_select_blocks", forced_only),
    ):
        model = tiny(letter)
        with monkeypatch.context() as patch:
            if letter == "S":
                patch.setattr(decoding.S2Decoder, "_plan", staticmethod(wrong))
            else:
                patch.setattr(decoding, "nsa_select_blocks", wrong)
            out = longctx.generate(model, prompt, max_new_tokens=8, return_logits=True)
        with torch.no_grad():
            full = model(out.tokens[:, :-1])[:, 39:]
        assert rel_err(out.logits, full) > 1e-3, name


def test_cache_memory_per_token_by_mixer():
    model = tiny("DSNL")
    out = longctx.generate(model, torch.randint(0, 128, (1, 16)), max_new_tokens=33)
    kv = 2 * 2 * 8 * 4  # keys and values, 2 kv heads of 8 dims, fp32, one sequence
    assert out.bytes_per_token["D"] == kv and out.bytes_per_token["S"] == kv
    # N adds one compressed key and value every cmp_stride = 4 tokens: 32 steps, 8 of them.
    assert out.bytes_per_token["N"] == kv * (1 + 1 / 4)
    # L keeps a [H, Dk, Dv] fp32 state whatever the length.
    assert out.bytes_per_token["L"] == 0 and out.cache_bytes["L"] == 4 * 8 * 8 * 4


def test_prefill_and_steps_continue_any_split():
    """Prefilling 10 tokens then stepping through 20 gives the last logits of prefilling all 30."""
    model = tiny("SNLD")
    tokens = torch.randint(0, 128, (1, 30))
    cache = ModelCache.empty(model, 1)
    prefill(model, tokens[:, :10], cache)
    for t in range(10, 30):
        stepped = decode_step(model, tokens[:, t], cache)
    whole = prefill(model, tokens, ModelCache.empty(model, 1))
    assert rel_err(stepped, whole) < 1e-5 and cache.length == 30
    with pytest.raises(ValueError, match="empty cache"):
        prefill(model, tokens, cache)


def test_sampling_is_seeded_and_top_p_narrows_to_the_argmax():
    model = tiny("DL")
    prompt = torch.randint(0, 128, (2, 5))
    a = longctx.generate(model, prompt, 12, temperature=1.0, seed=3).new_tokens
    b = longctx.generate(model, prompt, 12, temperature=1.0, seed=3).new_tokens
    c = longctx.generate(model, prompt, 12, temperature=1.0, seed=4).new_tokens
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = longctx.generate(model, prompt, 12).new_tokens
    assert torch.equal(longctx.generate(model, prompt, 12, temperature=1.0, top_p=1e-6).new_tokens, greedy)
    # Nucleus: with top_p 0.5 only the two tokens of mass 0.4 + 0.3 may be drawn.
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])).expand(2000, -1)
    drawn = sample_next(logits, 1.0, 0.5, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 1}
    with pytest.raises(ValueError, match="top_p"):
        longctx.generate(model, prompt, 2, top_p=0.0)


def test_generation_stops_at_eos():
    model = tiny("D")
    prompt = torch.randint(0, 128, (1, 6))
    first = longctx.generate(model, prompt, 1).new_tokens[0, 0].item()
    out = longctx.generate(model, prompt, 10, eos_id=first)
    assert out.new_tokens.tolist() == [[first]]


def test_cli_generate_prints_a_continuation(tmp_path, capsys):
    from longctx.cli import main
    from longctx.data import builtin_documents
    from longctx.tokenizer import Tokenizer, train_tokenizer
    from tests.test_eval import make_run, small_model

    tok = Tokenizer(train_tokenizer(builtin_documents(), 1024, tmp_path / "t.model"))
    model = small_model("DSNL", seed=2)
    run = make_run(tmp_path, tok, model)
    prompt = "The pass key is 123. Remember it. What is the pass key? The pass key is"
    code = main(["generate", "--run", str(run), "--prompt", prompt, "--max-new-tokens", "5", "--no-eos-stop"])
    assert code == 0
    captured = capsys.readouterr()
    expected = longctx.generate(model.eval(), tok.encode(prompt), 5).new_tokens[0].tolist()
    assert captured.out.strip() == tok.decode(expected).strip()
    assert "cache growth per generated token" in captured.err
    (tmp_path / "p.txt").write_text(prompt)
    assert (
        main(
            ["generate", "--run", str(run), "--prompt-file", str(tmp_path / "p.txt"), "--max-new-tokens", "2"]
        )
        == 0
    )
    assert main(["generate", "--run", str(run), "--prompt", "x", "--temperature", "-1"]) == 2
