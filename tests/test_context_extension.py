"""Continue-training to a longer context: the length schedule, its resume, and the GPU configs run at
reduced size on CPU (pretrain, then continue from it with YaRN and a schedule)."""

import json
from pathlib import Path

import pytest

from longctx.cli import main
from longctx.config import ConfigError, load_config

BASE = ["train.wandb=false", "train.progress=false"]


def _losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_schedule_stages_and_errors():
    cfg = load_config("configs/tiny.yaml", ["data.seq_len_schedule=64x3,128x2"])
    assert cfg.data.stages() == [(0, 64), (3, 128), (5, 512)]
    assert load_config("configs/tiny.yaml").data.stages() == [(0, 512)]
    with pytest.raises(ConfigError, match=r"seq_len_schedule\[0\].*'LENxSTEPS'"):
        load_config("configs/tiny.yaml", ["data.seq_len_schedule=64-3"])
    with pytest.raises(ConfigError, match=r"seq_len_schedule\[1\].*exceeds data.seq_len=512"):
        load_config("configs/tiny.yaml", ["data.seq_len_schedule=64x3,1024x2"])
    # Each stage must split into 2 * cp chunks of whole blocks, like data.seq_len itself.
    with pytest.raises(ConfigError, match=r"seq_len_schedule\[0\]: 80 does not split"):
        load_config("configs/tiny.yaml", ["data.seq_len_schedule=80x3", "parallel.cp=2"])


def test_schedule_trains_each_length_and_resumes_mid_schedule(tmp_path):
    common = [*BASE, f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=128", "model.layers=DSNL"]
    schedule = "data.seq_len_schedule=32x2,64x2"
    full = tmp_path / "full"
    args = ["train", "--config", "configs/tiny.yaml", *common, schedule, "train.steps=6"]
    assert main([*args, f"train.run_dir={full}", "train.ckpt_every=1", "train.keep_last=10"]) == 0
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    # batch 2: 2 steps of 32 tokens, 2 of 64, then 2 of data.seq_len = 128.
    assert [r["tokens"] for r in records] == [64, 128, 256, 384, 640, 896]
    # Resumed inside a stage (3) or on a stage boundary (4: saved at 64 tokens, resumed at 128), the
    # run sees the samples (and losses) the whole run saw.
    for step in (3, 4):
        resumed = tmp_path / f"resumed{step}"
        ckpt = full / "checkpoints" / f"step_{step:07d}"
        assert main([*args, f"train.run_dir={resumed}", f"train.resume={ckpt}"]) == 0
        want, got = _losses(full), _losses(resumed)
        assert sorted(got) == list(range(step + 1, 7))
        for s in got:
            assert got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-6)


REDUCED = [
    "model.dim=64",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.mlp_hidden=128",
    "model.n_layers=8",
    "model.vocab_size=1024",
    "model.s2.block_size=16",
    "model.s2.local_blocks=2",
    "model.s2.vert_stride=4",
    "model.s2.dense_heads=1",
    "model.nsa.cmp_block=16",
    "model.nsa.cmp_stride=8",
    "model.nsa.slc_block=16",
    "model.nsa.slc_top=3",
    "model.nsa.window=32",
    "parallel.cp=1",
    "train.steps=2",
    "train.log_every=1",
    "train.eval_every=0",
    "train.async_ckpt=false",
    "data.val_fraction=0.05",
]


def test_gpu_configs_build_and_train_at_reduced_size(tmp_path, capsys):
    """configs/hybrid-1b-32k.yaml and its 128k continuation, shrunk to CPU size but otherwise as
    written (layer pattern, YaRN, schedule, activation checkpointing): each trains; the second starts
    from the first's weights."""
    common = [*BASE, *REDUCED, f"data.cache_dir={tmp_path / 'cache'}"]
    pre = tmp_path / "pre"
    cfg = load_config("configs/hybrid-1b-32k.yaml")
    assert cfg.model.pattern == "LSLNLSLD" * 3 and cfg.data.seq_len == 32768
    pre_args = ["train", "--config", "configs/hybrid-1b-32k.yaml", *common, "data.seq_len=256"]
    assert main([*pre_args, f"train.run_dir={pre}"]) == 0
    cont = tmp_path / "cont"
    cont_args = ["train", "--config", "configs/hybrid-1b-128k-continue.yaml", *common]
    extra = ["data.seq_len=512", "data.seq_len_schedule=256x1", "model.rope.scaling.original_max_len=256"]
    capsys.readouterr()
    assert main([*cont_args, *extra, f"train.init_from={pre}", f"train.run_dir={cont}"]) == 0
    out = capsys.readouterr().out
    assert f"initialised the weights from {pre / 'checkpoints' / 'step_0000002'}" in out
    assert "step 2: seq_len 512 (data.seq_len_schedule stage 2 of 2)" in out
    records = [json.loads(line) for line in (cont / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in records] == [256, 256 + 512]
    saved = load_config(cont / "config.yaml")
    assert saved.model.rope.scaling.type == "yarn" and saved.model.rope.scaling.factor == 4.0


# ---- keeping short contexts: varying passkey samples, length mixtures, per-length evaluation ----


@pytest.fixture(scope="module")
def builtin_tok_docs(tmp_path_factory):
    import numpy as np

    from longctx.data import builtin_documents
    from longctx.data.indexed import TokenDocuments
    from longctx.tokenizer import Tokenizer, train_tokenizer

    tmp = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(train_tokenizer(builtin_documents(), 1024, tmp / "t.model"))
    ids = np.concatenate([tok.encode(t) + [tok.eos_id] for t in list(builtin_documents())[:10]])
    docs = TokenDocuments("builtin[:10]", ids.astype(np.int64), np.array([0]), np.array([len(ids)]))
    return tok, docs


def test_passkey_samples_vary_in_length_and_place(builtin_tok_docs):
    """Passkey training samples (data.passkey_min_share) share the sequence with corpus text: the
    answer lands at many positions, each row holds one needle and question whose key is the masked
    answer, and the sample is a document of its own (starts mark where it begins and ends)."""
    from longctx.data import PackedSampler, PasskeyMixture

    tok, docs = builtin_tok_docs
    length = 97
    sampler = PackedSampler(docs, length - 1, 8, seed=0, passkey=PasskeyMixture(1.0, tok, 3, min_share=0.25))
    answer_ends, seg_lens = set(), []
    for _ in range(4):
        batch = sampler.next_batch()
        for tokens, starts, mask in zip(batch.tokens, batch.doc_starts, batch.answer_mask):
            where = mask.nonzero().flatten().tolist()
            assert len(where) == 3 and where == list(range(where[0], where[0] + 3))
            key = tok.decode(tokens[where].tolist())
            seg_start = max(i for i in starts.nonzero().flatten().tolist() if i <= where[0])
            segment = tok.decode(tokens[seg_start : where[-1] + 1].tolist())
            assert segment.endswith(f"What is the pass key? The pass key is {key}")
            assert f"The pass key is {key}. Remember it." in segment
            if where[-1] + 1 < length:
                assert starts[where[-1] + 1], "the text after the sample is a new document"
            assert starts[0]
            answer_ends.add(where[-1])
            seg_lens.append(where[-1] + 1 - seg_start)
    assert len(answer_ends) > 10, "answers at many positions"
    assert min(seg_lens) >= 0.25 * length and max(seg_lens) > 0.75 * length
    # min_share=1.0: the sample fills the sequence, its answer at the end (the earlier format).
    whole = PackedSampler(docs, length - 1, 4, seed=0, passkey=PasskeyMixture(1.0, tok, 3)).next_batch()
    assert whole.answer_mask[:, -3:].all() and whole.answer_mask.sum() == 12


def test_length_schedule_keeps_each_share_over_every_window():
    from longctx.data.mixture import LengthSchedule

    for mix in ([(256, 0.3), (512, 0.7)], [(64, 0.2), (128, 0.3), (256, 0.5)]):
        orders = []
        for seed in range(3):
            schedule = LengthSchedule(mix, seed)
            steps = [schedule.length_at(n) for n in range(400)]
            orders.append(steps)
            for n, share in mix:
                hits = [int(s == n) for s in steps]
                for width in (10, 37, 400):
                    counts = [sum(hits[a : a + width]) for a in range(0, 400 - width + 1)]
                    # Each prefix count is within 1 of steps x share, so any window within 2.
                    assert all(abs(c - width * share) < 2 for c in counts), (mix, n, width)
        assert len({tuple(o) for o in orders}) > 1, "the seed changes the interleaving"


def test_seq_len_mix_config_errors():
    cfg = load_config("configs/tiny.yaml", ['data.seq_len_mix=["64:0.5","128:0.5"]', "data.seq_len=128"])
    assert cfg.data.stage_mixes() == [(0, [(64, 0.5), (128, 0.5)])]
    staged = load_config("configs/tiny.yaml", ["data.seq_len_schedule=64:0.25+128:0.75x3"])
    assert staged.data.stage_mixes() == [(0, [(64, 0.25), (128, 0.75)]), (3, [(512, 1.0)])]
    for bad, message in [
        ('["64:0.5","128:0.4"]', "shares must sum to 1"),
        ('["64","128:1"]', "'LEN:SHARE'"),
        ('["64:0.5","64:0.5"]', "lists a length twice"),
    ]:
        with pytest.raises(ConfigError, match=f"data.seq_len_mix: .*{message}"):
            load_config("configs/tiny.yaml", [f"data.seq_len_mix={bad}"])
    with pytest.raises(ConfigError, match=r"data.seq_len_mix: length 1024 exceeds data.seq_len=512"):
        load_config("configs/tiny.yaml", ['data.seq_len_mix=["512:0.5","1024:0.5"]'])
    with pytest.raises(ConfigError, match=r"data.seq_len_mix: 80 does not split into 4"):
        load_config("configs/tiny.yaml", ['data.seq_len_mix=["80:0.5","128:0.5"]', "parallel.cp=2"])
    with pytest.raises(ConfigError, match=r"train.eval_lengths: 80 does not split"):
        load_config("configs/tiny.yaml", ["train.eval_lengths=[80]", "train.eval_every=5", "parallel.cp=2"])
    scaled = ["model.rope.scaling.type=yarn", "model.rope.scaling.original_max_len=256", "data.seq_len=512"]
    assert load_config("configs/tiny.yaml", scaled).eval_lengths() == [256, 512]


def test_seq_len_mix_trains_each_length_and_resumes_mid_mixture(tmp_path):
    """A 64/128 mixture: each step one length, in the schedule's order, losses and tokens/s logged per
    length, val_loss@L and needle@L at each eval length; resumed mid-mixture it repeats the losses."""
    from longctx.data.mixture import LengthSchedule

    common = [
        *BASE,
        f"data.cache_dir={tmp_path / 'cache'}",
        "model.layers=D",
        "model.n_layers=1",
        "model.dim=32",
        "data.seq_len=128",
        'data.seq_len_mix=["64:0.5","128:0.5"]',
        "data.passkey_fraction=0.5",
        "data.passkey_digits=3",
        "train.batch_size=2",
        "train.eval_every=5",
        "train.eval_batches=1",
        "train.eval_lengths=[64,128]",
        "train.eval_needle_samples=1",
        "eval.depths=[0.5]",
    ]
    args = ["train", "--config", "configs/tiny.yaml", *common, "train.steps=5"]
    full = tmp_path / "full"
    assert main([*args, f"train.run_dir={full}", "train.ckpt_every=1", "train.keep_last=10"]) == 0
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    lengths = [LengthSchedule([(64, 0.5), (128, 0.5)], 0).length_at(n) for n in range(5)]
    steps = [r for r in records if "loss" in r]
    assert [b["tokens"] - a["tokens"] for a, b in zip(steps, steps[1:])] == [2 * n for n in lengths[1:]]
    for r, n in zip(steps, lengths):
        assert r[f"loss@{n}"] == r["loss"] and r[f"tokens_per_s@{n}"] > 0
    last = records[-1]
    assert {"val_loss@64", "val_loss@128", "needle@64", "needle@128"} <= set(last)
    assert last["val_loss"] == last["val_loss@128"] and 0.0 <= last["needle@64"] <= 1.0
    assert (full / "loss.png").is_file()
    resumed = tmp_path / "resumed"
    ckpt = full / "checkpoints" / "step_0000003"
    assert main([*args, f"train.run_dir={resumed}", f"train.resume={ckpt}"]) == 0
    want, got = _losses(full), _losses(resumed)
    assert sorted(got) == [4, 5]
    for s in got:
        assert got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-6)
