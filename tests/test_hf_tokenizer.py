"""Hugging Face `tokenizer.json` tokenizers used as they are: a byte-level BPE that groups digits the
way Llama 3's does (up to three a token), trained here with the `tokenizers` library."""

import json

import numpy as np
import pytest

from longctx.cli import main
from longctx.data import builtin_documents
from longctx.data.passkey import make_passkey_sample
from longctx.tokenizer import HFTokenizer, Tokenizer, find_tokenizer_file, open_tokenizer, train_tokenizer

tokenizers = pytest.importorskip("tokenizers")


def save_bpe(folder, vocab=1536, config: dict | None = None):
    """A byte-level BPE `tokenizer.json` (digits grouped by three) in `folder`, with `config` as its
    tokenizer_config.json (default: `<s>` BOS, `</s>` EOS)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Every number below 1000 often enough to become one token, as in Llama 3's vocabulary.
    texts = list(builtin_documents())[:200] + [" ".join(f"{n} {n:03d}" for n in range(1000))] * 10
    tok.train_from_iterator(texts, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if config is None:
        config = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return save_bpe(tmp_path_factory.mktemp("bpe") / "tok")


def test_tokenizer_json_round_trips_and_names_its_special_tokens(bpe_dir):
    tok = open_tokenizer(bpe_dir)
    assert isinstance(tok, HFTokenizer) and tok.path == bpe_dir / "tokenizer.json"
    text = "The pass key is 80317.\nRemember  it."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert (tok.bos_id, tok.eos_id) == (0, 1) and tok.bos_id not in ids
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]
    assert len(tok.encode("803")) < 3  # digits grouped, as Llama 3's tokenizer does
    assert [tok.decode([i]) for i in tok.digit_ids()] == [str(d) for d in range(10)]
    assert 1200 < tok.vocab_size <= 1536


def test_special_tokens_fall_back_to_config_json(tmp_path):
    folder = save_bpe(tmp_path / "tok", config={})
    assert open_tokenizer(folder).eos_id == -1
    (folder / "config.json").write_text(json.dumps({"eos_token_id": [1, 0], "bos_token_id": 0}))
    tok = open_tokenizer(f"hf:{folder}")
    assert (tok.bos_id, tok.eos_id) == (0, 1)


def test_open_tokenizer_finds_either_kind_and_names_what_is_missing(tmp_path, bpe_dir):
    sp = train_tokenizer(list(builtin_documents())[:100], 512, tmp_path / "sp" / "tokenizer.model")
    assert isinstance(open_tokenizer(sp), Tokenizer) and isinstance(open_tokenizer(sp.parent), Tokenizer)
    assert isinstance(open_tokenizer(bpe_dir / "tokenizer.json"), HFTokenizer)
    assert find_tokenizer_file(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="holds no tokenizer.json or tokenizer.model"):
        open_tokenizer(tmp_path)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a Hugging Face tokenizer.json"):
        open_tokenizer(tmp_path / "bad.json")


@pytest.mark.parametrize("n_digits", [1, 3, 7])
def test_passkey_answer_is_one_digit_token_a_position_with_grouped_digits(bpe_dir, n_digits):
    tok = open_tokenizer(bpe_dir)
    hay = np.asarray(tok.encode(" ".join(list(builtin_documents())[:5])))
    rng = np.random.default_rng(n_digits)
    s = make_passkey_sample(tok, hay, length=200, depth=0.5, rng=rng, n_digits=n_digits)
    assert len(s.tokens) == 200 and s.answer_start == 200 - n_digits
    if n_digits > 1:
        assert len(tok.encode(s.key)) < n_digits  # the key, encoded as text, would group digits
    answer = s.tokens[s.answer_start :].tolist()
    assert answer == [tok.digit_ids()[int(c)] for c in s.key]
    text = tok.decode(s.tokens[s.needle_start :].tolist())
    assert text.startswith(f"The pass key is {s.key}. Remember it. {s.key} is the pass key.")
    assert text.endswith(f"What is the pass key? The pass key is {s.key}")


def test_train_and_eval_with_a_tokenizer_json(tmp_path, bpe_dir):
    vocab = open_tokenizer(bpe_dir).vocab_size
    run = tmp_path / "run"
    args = [
        "train",
        "--config",
        "configs/tiny.yaml",
        f"data.tokenizer={bpe_dir}",
        f"model.vocab_size={vocab}",
        "model.layers=D",
        "model.n_layers=2",
        "data.seq_len=128",
        "data.passkey_fraction=0.5",
        "data.passkey_digits=4",
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.steps=2",
        "train.wandb=false",
        "train.progress=false",
        f"train.run_dir={run}",
    ]
    assert main(args) == 0
    assert (run / "tokenizer.json").is_file() and (run / "tokenizer_config.json").is_file()
    assert not (run / "tokenizer.model").exists()
    meta = next((tmp_path / "cache").glob("data-*/meta.json"))
    assert json.loads(meta.read_text())["eos_id"] == 1
    code = main(
        ["eval", "niah", "--run", str(run), "--lengths", "128", "--depths", "0.5", "--samples", "1",
         "--digits", "4", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    assert json.loads((run / "niah" / "results.json").read_text())["n_digits"] == 4


def test_prepare_refuses_a_tokenizer_without_end_of_text(tmp_path, capsys):
    folder = save_bpe(tmp_path / "tok", config={})
    args = [
        "data",
        "prepare",
        "--config",
        "configs/tiny.yaml",
        f"data.tokenizer={folder}",
        "model.vocab_size=2048",
    ]
    assert main([*args, f"data.cache_dir={tmp_path / 'cache'}"]) == 2
    assert "has no end-of-text token" in capsys.readouterr().err
