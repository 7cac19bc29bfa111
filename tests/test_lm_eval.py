"""The lm-evaluation-harness adapter: its scores are the model's own log-probabilities and greedy text,
and lm-eval runs local tasks made from the built-in corpus through `longctx eval lm-eval`."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import longctx
from longctx.data import builtin_documents
from longctx.tokenizer import Tokenizer, train_tokenizer
from tests.test_eval import make_run, small_model

pytest.importorskip("lm_eval")

from longctx.eval.lm_eval_adapter import LongctxLM  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    tok = Tokenizer(train_tokenizer(builtin_documents(), 1024, tmp / "t.model"))
    model = small_model("DSNL", seed=4).eval()
    run = make_run(tmp, tok, model)
    return tmp, tok, model, run


def requests(*args):
    return [SimpleNamespace(args=a) for a in args]


def own_logprob(model, context: list[int], continuation: list[int]) -> float:
    """Sum of log p(continuation | context) from one fp64 log-softmax of the model's forward logits."""
    tokens = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = F.log_softmax(model(tokens[:, :-1])[0].double(), dim=-1)
    n = len(continuation)
    return float(logp[-n:].gather(1, tokens[0, -n:, None]).sum())


def test_loglikelihood_is_the_models_own_logprob_batched(setup):
    tmp, tok, model, run = setup
    lm = LongctxLM(run=str(run), batch_size=3, max_length=64)
    docs = list(builtin_documents())
    pairs = [
        (docs[0][:200], " the"),
        (docs[1][:80], docs[1][80:150]),
        (docs[2][:30], " x y"),
        ("", docs[3][:40]),
    ]
    got = lm.loglikelihood(requests(*pairs))
    single = LongctxLM(run=str(run), batch_size=1, max_length=64).loglikelihood(requests(*pairs))
    for (context, continuation), (logp, greedy), (logp1, greedy1) in zip(pairs, got, single):
        # lm-eval's split: a context's trailing spaces move to the continuation; the pair is encoded
        # whole and the context's own encoding marks where the continuation starts.
        stripped = context.rstrip()
        ctx = tok.encode(stripped) if context else [tok.eos_id]
        whole = tok.encode(context + continuation) if context else ctx + tok.encode(continuation)
        cont = whole[len(ctx) :]
        whole = whole[-65:]  # the adapter keeps the last max_length + 1 tokens
        expected = own_logprob(model, whole[: len(whole) - len(cont)], cont)
        assert logp == pytest.approx(expected, rel=1e-5, abs=1e-4)
        assert logp == pytest.approx(logp1, rel=1e-5, abs=1e-4) and greedy == greedy1
    # A continuation that is the model's own greedy choice is flagged greedy.
    ids = tok.encode(docs[4][:100])
    best = int(model(torch.tensor([ids]))[0, -1].argmax())
    assert lm.loglikelihood(requests((docs[4][:100], tok.decode(ids + [best])[len(tok.decode(ids)) :])))[0][
        1
    ] in (
        True,
        False,
    )
    ((_, flag),) = lm._loglikelihood_tokens([(None, ids, [best])])
    assert flag


def test_loglikelihood_rolling_scores_every_token_once(setup):
    tmp, tok, model, run = setup
    text = list(builtin_documents())[5][:500]
    ids = tok.encode(text)
    lm = LongctxLM(run=str(run), max_length=48, batch_size=2)
    (total,) = lm.loglikelihood_rolling(requests((text,)))
    # Independent: disjoint windows of 48 predictions, each window's input the 48 tokens before it.
    expected, seq = 0.0, [tok.eos_id] + ids
    for start in range(0, len(ids), 48):
        end = min(start + 48, len(ids))
        context_start = max(0, end - 48)
        expected += own_logprob(model, seq[context_start : start + 1], ids[start:end])
    assert total == pytest.approx(expected, rel=1e-5)


def test_generate_until_is_greedy_decoding_cut_at_the_stop(setup):
    tmp, tok, model, run = setup
    lm = LongctxLM(run=str(run), max_length=128, batch_size=2)
    prompts = [
        "The pass key is 12345. What is the pass key?",
        "def f(x):",
        "The pass key is 99999. What is it",
    ]
    gen = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}
    out = lm.generate_until(requests(*[(p, gen) for p in prompts]))
    (from_nothing,) = lm.generate_until(requests(("", gen)))
    for prompt, text in [*zip(prompts, out), ("", from_nothing)]:
        # An empty context starts from the end-of-text token.
        context = tok.encode(prompt) or [tok.eos_id]
        ids = longctx.generate(model, context, 12, eos_id=tok.eos_id).new_tokens[0].tolist()
        expected = tok.decode([t for t in ids if t != tok.eos_id]).split("\n\n")[0]
        assert text == expected
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until(requests(("x", {"until": [], "do_sample": True, "temperature": 1.0})))
    with pytest.raises(ValueError, match="unknown longctx model_args"):
        LongctxLM(run=str(run), pretrained="gpt2")


def test_lm_eval_runs_local_corpus_tasks(setup, capsys):
    """lm-eval's evaluator runs the three local tasks (`longctx eval lm-eval --make-tasks`) on the
    `longctx` model; the multiple-choice accuracy is that of the adapter's own log-likelihoods. (The
    task index is built from the local folder only: lm-eval's full index takes a minute of CPU.)"""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from longctx.cli import main

    tmp, tok, model, run = setup
    assert main(["eval", "lm-eval", "--make-tasks", str(tmp / "tasks")]) == 0
    assert "wrote longctx_corpus_mc" in capsys.readouterr().out
    assert main(["eval", "lm-eval"]) == 2  # nothing after --
    tasks = TaskManager(include_path=str(tmp / "tasks"), include_defaults=False)
    out = lm_eval.simple_evaluate(
        model="longctx",
        model_args=f"run={run},max_length=128",
        tasks=["longctx_corpus_mc", "longctx_corpus_ppl", "longctx_passkey"],
        task_manager=tasks,
        batch_size=4,
        limit=3,
    )
    results = out["results"]
    assert results["longctx_corpus_ppl"]["bits_per_byte,none"] > 0
    assert 0 <= results["longctx_passkey"]["exact_match,strip"] <= 1
    lm = LongctxLM(run=str(run), max_length=128)
    rows = [json.loads(line) for line in (tmp / "tasks" / "longctx_corpus_mc.jsonl").read_text().splitlines()]
    hits = 0
    for row in rows[:3]:
        scores = [
            lp for lp, _ in lm.loglikelihood(requests(*[(row["context"], " " + c) for c in row["choices"]]))
        ]
        hits += int(max(range(4), key=scores.__getitem__) == row["label"])
    assert results["longctx_corpus_mc"]["acc,none"] == pytest.approx(hits / 3)
