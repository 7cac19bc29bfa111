"""Needle-in-a-haystack and perplexity-by-position evaluation, and the `longctx eval` commands."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longctx.cli import main
from longctx.config import ModelConfig, NSAConfig, S2Config, load_config, save_config
from longctx.data import builtin_documents
from longctx.data.indexed import TokenDocuments
from longctx.eval import (
    NiahOptions,
    answer_logits,
    evaluate_niah,
    evaluate_ppl,
    niah_sample,
    niah_table,
    token_losses,
)
from longctx.eval.niah import write_niah
from longctx.model import build_model
from longctx.tokenizer import Tokenizer, train_tokenizer
from longctx.weights import EVAL_FIX, find_weights, load_model_for_eval, load_weights

KEY_PATTERN = re.compile(r"The pass key is (\d+)\.")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "t.model"
    return Tokenizer(train_tokenizer(builtin_documents(), 1024, path))


@pytest.fixture(scope="module")
def haystack(tokenizer):
    texts = list(builtin_documents())[:20]
    ids = [np.asarray(tokenizer.encode(t) + [tokenizer.eos_id], dtype=np.int64) for t in texts]
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return TokenDocuments("builtin[:20]", np.concatenate(ids), starts, lengths)


def small_model(layers: str = "DSNL", seed: int = 0, dim: int = 32) -> torch.nn.Module:
    cfg = ModelConfig(
        vocab_size=1024,
        dim=dim,
        n_layers=len(layers),
        n_heads=2,
        layers=layers,
        s2=S2Config(block_size=16, local_blocks=1, vert_stride=2),
        nsa=NSAConfig(cmp_block=16, cmp_stride=8, slc_block=16, slc_top=3, window=16),
    )
    torch.manual_seed(seed)
    return build_model(cfg)


def oracle_forward(tokenizer, vocab_size: int, shift: int = 0):
    """An answer-logits function that reads the key from the needle sentence in the decoded text,
    as a model that retrieves perfectly would (`shift` > 0 makes it answer wrong digits)."""
    digit_ids = tokenizer.digit_ids()

    def forward(tokens, positions):
        logits = torch.zeros(*positions.shape, vocab_size)
        for b, row in enumerate(tokens):
            key = KEY_PATTERN.search(tokenizer.decode(row.tolist())).group(1)
            for j in range(positions.shape[1]):
                logits[b, j, digit_ids[(int(key[j]) + shift) % 10]] = 1.0
        return logits

    return forward


def test_niah_sample_is_deterministic_and_answer_is_last(tokenizer, haystack):
    a = niah_sample(tokenizer, haystack, 96, 0.5, seed=3, index=7, n_digits=4)
    b = niah_sample(tokenizer, haystack, 96, 0.5, seed=3, index=7, n_digits=4)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.key == b.key and len(a.tokens) == 97
    digits = tokenizer.digit_ids()
    assert a.tokens[-4:].tolist() == [digits[int(c)] for c in a.key]
    others = [niah_sample(tokenizer, haystack, 96, 0.5, seed=3, index=i, n_digits=4).key for i in range(8)]
    assert len(set(others)) > 1
    c = niah_sample(tokenizer, haystack, 96, 0.5, seed=4, index=7, n_digits=4)
    assert not np.array_equal(a.tokens, c.tokens)


def test_answer_logits_and_hidden_match_full_logits(tokenizer, haystack):
    model = small_model().eval()
    tokens = torch.from_numpy(niah_sample(tokenizer, haystack, 64, 0.3, 0, 0, 5).tokens[None, :-1])
    positions = torch.tensor([[59, 60, 61, 62, 63]])
    with torch.no_grad():
        full = model(tokens)  # [1, 64, vocab]
        hidden = model(tokens, return_hidden=True)
        picked = answer_logits(model, tokens, positions)
    assert hidden.shape == (1, 64, 32)
    torch.testing.assert_close(model.output(hidden), full)
    torch.testing.assert_close(picked, full[:, 59:64])


def test_untrained_model_scores_near_zero(tokenizer, haystack):
    model = small_model()
    options = NiahOptions([64, 96], [0.0, 0.5, 1.0], samples=6, n_digits=5, batch_size=4, progress=False)
    results = evaluate_niah(model, tokenizer, haystack, options)
    acc = np.asarray(results["accuracy"])
    assert acc.shape == (2, 3)
    # A random guess of a 5-digit key succeeds with probability 1e-5.
    assert acc.max() == 0.0
    assert np.asarray(results["digit_accuracy"]).mean() < 0.3
    assert model.training, "the model's training mode is restored"


def test_oracle_scores_one_and_a_wrong_oracle_zero(tokenizer, haystack):
    model = small_model()
    options = NiahOptions(lengths=[64, 128], depths=[0.0, 0.25, 1.0], samples=5, n_digits=3, batch_size=2)
    good = evaluate_niah(model, tokenizer, haystack, options, forward=oracle_forward(tokenizer, 1024))
    assert good["accuracy"] == [[1.0] * 3] * 2
    assert good["digit_accuracy"] == [[1.0] * 3] * 2
    wrong = evaluate_niah(model, tokenizer, haystack, options, forward=oracle_forward(tokenizer, 1024, 1))
    assert wrong["accuracy"] == [[0.0] * 3] * 2


def test_results_heatmap_and_table_written(tmp_path, tokenizer, haystack):
    options = NiahOptions([64], [0.0, 1.0], samples=2, n_digits=2, progress=False)
    results = evaluate_niah(small_model(), tokenizer, haystack, options)
    json_path, png_path = write_niah(results, tmp_path / "niah")
    assert json.loads(json_path.read_text()) == results
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = niah_table(results)
    assert "d=0" in table and "d=1" in table
    assert any(line.split()[0] == "64" for line in table.splitlines()[1:])


def test_token_losses_match_cross_entropy_and_ppl_buckets(tokenizer, haystack):
    model = small_model().eval()
    tokens = torch.from_numpy(haystack.read(0, 65)[0])[None]
    with torch.no_grad():
        losses = token_losses(model, tokens[:, :-1], tokens[:, 1:], chunk=24)
        expected = F.cross_entropy(model(tokens[:, :-1])[0], tokens[0, 1:], reduction="none")
    torch.testing.assert_close(losses[0], expected)
    results = evaluate_ppl(model, haystack, seq_len=64, batch_size=2, batches=2, n_buckets=4, progress=False)
    assert results["buckets"] == [[0, 16], [16, 32], [32, 48], [48, 64]]
    assert results["tokens"] == 2 * 2 * 64
    # An untrained model is near uniform over the vocabulary in every bucket.
    assert all(abs(x - np.log(1024)) < 0.5 for x in results["loss"])
    with pytest.raises(ValueError, match="equal buckets"):
        evaluate_ppl(model, haystack, seq_len=64, n_buckets=5, progress=False)


def make_run(tmp_path, tokenizer, model):
    """A run directory as training leaves it (config, tokenizer), with exported weights."""
    from safetensors.torch import save_file

    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(None)
    cfg.model = model.cfg
    save_config(cfg, run / "config.yaml")
    (run / "tokenizer.model").write_bytes(tokenizer.path.read_bytes())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, run / "model.safetensors")
    return run


def test_cli_eval_niah_and_ppl_load_exported_weights(tmp_path, tokenizer, capsys):
    model = small_model(seed=5)
    run = make_run(tmp_path, tokenizer, model)
    hay = tmp_path / "hay.txt"
    hay.write_text("\n".join(list(builtin_documents())[:5]))
    code = main(
        [
            "eval",
            "niah",
            "--run",
            str(run),
            "--lengths",
            "64",
            "--depths",
            "0,1",
            "--samples",
            "2",
            "--digits",
            "3",
            "--haystack",
            str(hay),
            "--no-progress",
        ]
    )
    assert code == 0
    results = json.loads((run / "niah" / "results.json").read_text())
    assert results["lengths"] == [64] and results["depths"] == [0.0, 1.0] and results["n_digits"] == 3
    assert (run / "niah" / "heatmap.png").is_file()
    assert "needle in a haystack" in capsys.readouterr().out

    out = tmp_path / "ppl"
    code = main(
        [
            "eval",
            "ppl",
            "--run",
            str(run),
            "--seq-len",
            "64",
            "--batches",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    assert len(json.loads((out / "ppl.json").read_text())["loss"]) == 8


def test_cli_eval_ppl_compares_two_runs_at_each_length(tmp_path, tokenizer, capsys):
    """`eval ppl --compare A B --lengths`: both runs at each length, by bucket and overall; the overall
    loss equals plain cross-entropy of the model's full logits on the same held-out samples."""
    from longctx.data import PackedSampler, prepare_dataset

    runs = []
    for name, seed in (("a", 5), ("b", 6)):
        (tmp_path / name).mkdir()
        runs.append(make_run(tmp_path / name, tokenizer, small_model(seed=seed)))
    args = ["eval", "ppl", "--compare", *map(str, runs), "--lengths", "32,64", "--batches", "1"]
    assert main([*args, "--buckets", "4", "--batch-size", "2", "--no-progress"]) == 0
    table = capsys.readouterr().out
    compare = json.loads((runs[1] / "ppl-compare" / "ppl-compare.json").read_text())
    assert list(compare) == [str(r) for r in runs]  # both are named "run": full paths tell them apart
    assert (runs[1] / "ppl-compare" / "ppl-compare.png").is_file()
    assert "vs " in table and sum(line.split()[1] == "all" for line in table.splitlines()[2:]) == 2
    for run, results in zip(runs, compare.values()):
        model, cfg, tok = load_model_for_eval(run)
        docs = prepare_dataset(cfg.data, tok, progress=False).val
        for length, res in zip((32, 64), results):
            tokens = PackedSampler(docs, length, 2, seed=cfg.train.seed).get_batch(0).tokens
            with torch.no_grad():
                logits = model(tokens[:, :-1])
            want = F.cross_entropy(logits.flatten(0, 1).double(), tokens[:, 1:].flatten())
            assert res["seq_len"] == length and len(res["loss"]) == 4
            assert res["overall_loss"] == pytest.approx(float(want), rel=1e-5)
            assert res["overall_ppl"] == pytest.approx(float(want.exp()), rel=1e-5)
    assert main(["eval", "ppl", "--run", str(runs[0]), "--compare", *map(str, runs)]) != 0
    assert "needs either --run RUN or --compare RUN_A RUN_B" in capsys.readouterr().err


def test_checkpoint_loading_checks_names_shapes_and_format(tmp_path, tokenizer):
    model = small_model(seed=1)
    run = make_run(tmp_path, tokenizer, model)
    other = small_model(seed=2)
    load_weights(other, find_weights(None, run), EVAL_FIX)  # a folder holding model.safetensors
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[name], tensor, rtol=0, atol=0)

    with pytest.raises(ValueError, match="missing"):
        load_weights(small_model(layers="DSNLD"), run / "model.safetensors", EVAL_FIX)
    shapes = r"'tok_embeddings.weight' has shape \[1024, 32\] in the checkpoint but \[1024, 64\]"
    with pytest.raises(ValueError, match=shapes):
        load_weights(small_model(dim=64), run / "model.safetensors", EVAL_FIX)
    (tmp_path / "dcp").mkdir()
    with pytest.raises(ValueError, match="is not a checkpoint"):
        find_weights(None, tmp_path / "dcp")
    with pytest.raises(FileNotFoundError, match="not found"):
        find_weights(None, tmp_path / "nothing")
    code = main(["eval", "niah", "--run", str(tmp_path / "nothing")])
    assert code == 2


def test_context_parallel_eval_under_torchrun_equals_one_process(tmp_path, tokenizer):
    """`longctx eval niah` on 2 processes with parallel.cp=2 (each holds half of every sequence)
    gives the one-process accuracies. The LM head keeps only the digit rows, so the argmax is always
    some digit and the per-digit hits (about 1 in 10) depend on every layer's output."""
    from tests.dist_utils import run_cli

    model = small_model(layers="DSNL", seed=3)
    with torch.no_grad():
        keep = torch.zeros(model.cfg.vocab_size, dtype=torch.bool)
        keep[tokenizer.digit_ids()] = True
        model.output.weight[~keep] = 0.0
        model.output.weight[keep] *= 50.0
    run = make_run(tmp_path, tokenizer, model)
    hay = tmp_path / "hay.txt"
    hay.write_text("\n".join(list(builtin_documents())[:5]))
    args = ["eval", "niah", "--run-dir", str(run), "--lengths", "128", "--depths", "0,0.5,1"]
    args += ["--samples", "6", "--digits", "3", "--haystack", str(hay), "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0  # one process: this one
    two = run_cli([*args, "--out", str(tmp_path / "two"), "parallel.cp=2"], nproc=2)
    assert two.returncode == 0, two.stderr
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    assert b["processes"] == {"dp": 1, "cp": 2}
    assert a["digit_accuracy"] == b["digit_accuracy"] and a["accuracy"] == b["accuracy"]
    assert 0 < np.mean(a["digit_accuracy"]) < 0.5  # not trivially zero
    # Two data-parallel processes (no CP) split the samples and count them once.
    dp = run_cli([*args, "--out", str(tmp_path / "dp")], nproc=2)
    assert dp.returncode == 0, dp.stderr
    c = json.loads((tmp_path / "dp" / "results.json").read_text())
    assert c["processes"] == {"dp": 2, "cp": 1} and c["digit_accuracy"] == a["digit_accuracy"]


def _niah(lengths: list[int], exact: list[float]) -> dict:
    cells = [[e, e] for e in exact]
    return {"lengths": lengths, "accuracy": cells, "digit_accuracy": cells}


def test_demo_summary_fails_on_each_missed_target():
    """The demo's closing table: every target of issue #27 checked; one missed makes it fail."""
    from longctx.demo import summary

    lengths = [128, 192, 256, 384, 512]
    pre = _niah(lengths, [0.9, 0.95, 1.0, 0.3, 0.2])

    def ppl(before: float, after: float) -> dict:
        return {
            "pre": [{"seq_len": 256, "overall_ppl": before}, {"seq_len": 512, "overall_ppl": 40.0}],
            "ext": [{"seq_len": 256, "overall_ppl": after}, {"seq_len": 512, "overall_ppl": 30.0}],
        }

    good = _niah(lengths, [0.9, 0.9, 0.95, 0.9, 0.92])
    text, met = summary(pre, good, ppl(20.0, 20.9), {}, 256, 700, 14.0)
    assert met and "MISSED" not in text and "+4.5%" in text
    assert "0.95 (0.95)" in text.splitlines()[5]  # the L row: extended exact (per-digit)
    for bad, why in [
        (_niah(lengths, [0.9, 0.9, 0.94, 0.9, 0.92]), "at L=256"),  # 0.06 below the pretrained at L
        (_niah(lengths, [0.9, 0.9, 0.95, 0.9, 0.89]), "at 2L=512"),
        (_niah(lengths, [0.84, 0.9, 0.95, 0.9, 0.92]), "at 128, 192, 384"),
    ]:
        text, met = summary(pre, bad, ppl(20.0, 20.9), {}, 256, 700, 14.0)
        assert not met and [line for line in text.splitlines() if "MISSED" in line][0].count(why) == 1
    text, met = summary(pre, good, ppl(20.0, 21.1), {}, 256, 700, 14.0)
    assert not met and "[MISSED] extended held-out perplexity" in text
