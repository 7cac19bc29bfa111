"""Hugging Face import and export: small random Llama, Mistral and Qwen2 models made and saved by
`transformers` (the reference), imported into longctx, continue-trained (also at cp=2 and with
converted S/N/L layers) and exported back."""

import ast
import json
import warnings
from pathlib import Path

import pytest
import torch

from longctx.cli import main
from longctx.config import ConfigError
from longctx.hf import HFCheckpointError, check_architecture, load_config, load_pretrained, model_section
from longctx.tokenizer import Tokenizer, train_tokenizer
from tests.dist_utils import losses, run_many

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"longctx.kernels": "kernels", "longctx.parallel": "parallel", "longctx.bench": "bench"}

VOCAB = 384
CASES = {
    # Llama 3.1-style RoPE scaling; saved in several shards (model.safetensors.index.json).
    "llama3": dict(
        kind="llama",
        rope_theta=50000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        max_position_embeddings=256,
        shard="60KB",
    ),
    "llama-yarn": dict(
        kind="llama",
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
        max_position_embeddings=128,
    ),
    # A sliding window shorter than the test sequence.
    "mistral": dict(kind="mistral", sliding_window=16),
    # q/k/v biases and tied embeddings.
    "qwen2": dict(kind="qwen2", tie_word_embeddings=True),
}


def make_hf(path, kind="llama", shard=None, vocab=VOCAB, seed=0, n_layers=2, **extra):
    """A random `transformers` model of `kind` saved to `path`; returns it (eval mode)."""
    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }
    config_cls, model_cls = classes[kind]
    config = config_cls(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        **extra,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        # Larger weights than the default init, so that a wrongly mapped tensor changes the logits a lot.
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    return model


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A SentencePiece tokenizer of VOCAB tokens trained on the built-in corpus (a Llama 2-style
    `tokenizer.model`)."""
    from longctx.data.corpus import Corpus

    root = tmp_path_factory.mktemp("sp")
    docs = Corpus("builtin", "text", str(root / "cache")).documents(max_chars=400_000)
    return train_tokenizer(docs, VOCAB, root / "tokenizer.model")


@pytest.mark.parametrize("case", list(CASES))
def test_import_gives_transformers_logits(tmp_path, case):
    spec = dict(CASES[case])
    ref = make_hf(tmp_path, **spec)
    if spec.get("shard"):
        assert (tmp_path / "model.safetensors.index.json").is_file()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, tokenizer = load_pretrained(f"hf:{tmp_path}")
    assert tokenizer is None and any("no tokenizer" in str(w.message) for w in caught)
    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), ref(tokens).logits
    assert ours.shape == (2, 48, VOCAB)
    assert relative(ours, theirs) < 1e-4
    cfg = model.cfg
    assert (cfg.n_kv_heads, cfg.mlp_hidden, cfg.pattern) == (2, 160, "DD")
    assert cfg.qkv_bias == (case == "qwen2") and cfg.tie_embeddings == (case == "qwen2")
    assert cfg.dense_window == (16 if case == "mistral" else None)
    assert cfg.rope.scaling.type == {"llama3": "llama3", "llama-yarn": "yarn"}.get(case, "none")


def test_load_pretrained_uses_the_folder_tokenizer(tmp_path, sp_model):
    make_hf(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    model, tokenizer = load_pretrained(f"hf:{tmp_path}")
    assert isinstance(tokenizer, Tokenizer) and tokenizer.vocab_size == VOCAB
    ids = tokenizer.encode("The passkey is 12345.")
    assert tokenizer.decode(ids) == "The passkey is 12345."
    assert model(torch.tensor([ids])).shape == (1, len(ids), VOCAB)


@pytest.mark.filterwarnings("ignore:.*no tokenizer")
def test_converted_layers_start_from_the_dense_ones(tmp_path):
    make_hf(tmp_path)
    tokens = torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(2))
    dense, _ = load_pretrained(tmp_path)
    # S2 whose local band covers the whole sequence is dense attention with the same weights.
    s2, _ = load_pretrained(
        tmp_path, layers="S", overrides=["model.s2.block_size=16", "model.s2.local_blocks=4"]
    )
    nsa, _ = load_pretrained(
        tmp_path,
        layers="N",
        overrides=["model.nsa.slc_block=16", "model.nsa.slc_top=4", "model.nsa.window=64"],
    )
    linear, _ = load_pretrained(tmp_path, layers="LD")
    with torch.no_grad():
        want = dense(tokens)
        assert relative(s2(tokens), want) < 1e-5
        # Selection covers every block here: ~0.98 dense + small compression and window shares.
        assert relative(nsa(tokens), want) < 0.1
        got_linear = linear(tokens)
    assert torch.isfinite(got_linear).all() and relative(got_linear, want) > 1e-3
    for name in ("wq", "wk", "wv", "wo"):
        d = getattr(dense.layers[0].mixer, name).weight
        for converted in (s2, nsa, linear):
            assert torch.equal(getattr(converted.layers[0].mixer, name).weight, d)
    gate = nsa.layers[0].mixer.gate
    assert torch.count_nonzero(gate.weight) == 0
    assert torch.equal(gate.bias.view(4, 3)[:, 1], torch.full((4,), 4.0))
    assert torch.count_nonzero(nsa.layers[0].mixer.compress_k.w2) == 0
    # The linear layer's own parameters start as in a fresh model (not zero, not copied).
    assert linear.layers[0].mixer.w_g.weight.std() > 0 and linear.layers[1].letter == "D"


@pytest.mark.filterwarnings("ignore:.*no tokenizer")
def test_converted_delta_layers_take_the_dense_projections(tmp_path):
    """G layers: the dense q/k/v/o, identity convolutions (so q, k, v are SiLU of the dense
    projections), a fresh decay and gate; the converted model runs and differs from the dense one."""
    import torch.nn.functional as F

    make_hf(tmp_path)
    tokens = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    dense, _ = load_pretrained(tmp_path)
    delta, _ = load_pretrained(tmp_path, layers="GD")
    mixer = delta.layers[0].mixer
    for name in ("wq", "wk", "wv", "wo"):
        assert torch.equal(getattr(mixer, name).weight, getattr(dense.layers[0].mixer, name).weight)
    x = torch.randn(1, 7, mixer.wq.in_features)
    qkv, _, _ = mixer.gates(x)
    q, k, v = mixer.core.prepare(qkv, mixer.conv_weight(), None)
    assert torch.allclose(q, F.normalize(F.silu(mixer.wq(x)).view(1, 7, mixer.n_heads, -1), dim=-1))
    assert torch.allclose(v[:, :, 0], F.silu(mixer.wv(x)).view(1, 7, mixer.n_kv_heads, -1)[:, :, 0])
    assert torch.isfinite(mixer.A_log).all() and mixer.w_og.weight.std() > 0
    with torch.no_grad():
        got, want = delta(tokens), dense(tokens)
    assert torch.isfinite(got).all() and relative(got, want) > 1e-3
    assert delta.layers[1].letter == "D"


def test_bad_folders_name_the_problem(tmp_path):
    with pytest.raises(HFCheckpointError, match="no config.json"):
        model_section(f"hf:{tmp_path}")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(HFCheckpointError, match="model_type 'gpt2' is not supported"):
        model_section(tmp_path)
    make_hf(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(HFCheckpointError, match="no safetensors weights.*pytorch_model.bin"):
        load_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFCheckpointError, match="RoPE type 'longrope'"):
        model_section(tmp_path)


def test_init_from_sets_the_architecture_and_tokenizer(tmp_path, sp_model):
    hf = tmp_path / "hf"
    make_hf(hf, **CASES["llama3"])
    init = f"train.init_from=hf:{hf}"
    with pytest.raises(ConfigError, match="data.tokenizer: .* has no tokenizer.json or tokenizer.model"):
        load_config(None, [init])
    (hf / "tokenizer.model").write_bytes(sp_model.read_bytes())
    cfg = load_config(None, [init, "model.layers=LLLD", "model.rope.scaling.type=yarn"])
    m = cfg.model
    assert (m.vocab_size, m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.mlp_hidden) == (
        VOCAB,
        64,
        2,
        4,
        2,
        160,
    )
    assert m.norm_eps == 1e-6 and m.rope.theta == 50000.0 and m.pattern == "LL"
    # The config's scaling replaces the checkpoint's and extends from the length it was trained at.
    assert m.rope.scaling.type == "yarn" and m.rope.scaling.factor == 1.0
    assert m.rope.scaling.original_max_len == 256
    assert cfg.data.tokenizer == str(hf)
    with pytest.raises(ConfigError, match="model.dim=128 contradicts .* which has 64; .* drop the override"):
        load_config(None, [init, "model.dim=128"])
    # A config file written for another model gives way to the checkpoint, and says so.
    with pytest.warns(UserWarning, match=r"model.dim 128 -> 64, .*model.rope.theta 10000.0 -> 50000.0"):
        cfg = load_config("configs/tiny.yaml", [init, "model.layers=LLLD"])
    assert (cfg.model.dim, cfg.model.vocab_size, cfg.model.rope.theta) == (64, VOCAB, 50000.0)
    assert cfg.model.s2.block_size == 16  # mixer settings stay the file's
    # Raising RoPE's base on the command line is a continue-training recipe of its own: allowed.
    assert load_config(None, [init, "model.rope.theta=1e6"]).model.rope.theta == 1e6
    check_architecture(cfg.model, f"hf:{hf}")
    # Built without resolving init_from (longctx.config alone): the trainer refuses the mismatch.
    from longctx.config import load_config as load_plain

    plain = load_plain("configs/tiny.yaml", [init])
    with pytest.raises(ConfigError, match=r"model.vocab_size=.* but train.init_from=.*hf.load_config"):
        check_architecture(plain.model, f"hf:{hf}")


def module_file(name: str) -> Path | None:
    parts = name.split(".")
    top = ".".join(parts[:2])
    base = REPO / PACKAGE_DIRS[top] / Path(*parts[2:]) if top in PACKAGE_DIRS else REPO / Path(*parts)
    for file in (base.with_suffix(".py"), base / "__init__.py"):
        if file.is_file():
            return file
    return None


def imports_on_import(name: str) -> set[str]:
    """The longctx modules (and their parent packages) that importing `name` imports, read from the
    import statements run at import time (the module's own and those in its if/try blocks)."""

    def top_level(body):
        for node in body:
            yield node
            if isinstance(node, (ast.If, ast.Try)):
                yield from top_level(node.body + node.orelse + getattr(node, "finalbody", []))

    seen, todo = set(), [name]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        file = module_file(module)
        if file is None:  # a namespace package (longctx.train)
            continue
        names = set()
        for node in top_level(ast.parse(file.read_text()).body):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        for found in names:
            parts = found.split(".")
            if parts[0] == "longctx" and (module_file(found) or (REPO / Path(*parts)).is_dir()):
                todo += [".".join(parts[: i + 1]) for i in range(len(parts))]
    return seen


def test_config_and_model_import_nothing_of_hf():
    # The walk finds longctx.hf where it is imported (the command line), through the packages.
    assert "longctx.hf.weights" in imports_on_import("longctx.cli")
    assert "longctx.model.transformer" in imports_on_import("longctx.model")
    for leaf in ("longctx.config", "longctx.model"):
        reached = imports_on_import(leaf)
        assert not [m for m in reached if m.startswith("longctx.hf")], leaf


DENSE_CFG, HYBRID_CFG = "configs/llama3-8b-128k.yaml", "configs/llama3-8b-128k-hybrid.yaml"


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory, sp_model):
    """An imported 4-layer Llama continue-trained with the shipped Llama-3-8B configs, shrunk to CPU
    size: all dense in one process and at cp=2 (FSDP, as the config says), a converted DSNL stack in
    one process, and LLLD at cp=2 as a new user would run it."""
    root = tmp_path_factory.mktemp("hf-runs")
    hf = root / "hf"
    make_hf(hf, n_layers=4, **CASES["llama3"])
    (hf / "tokenizer.model").write_bytes(sp_model.read_bytes())
    base = [
        f"train.init_from=hf:{hf}",
        "data.seq_len=128",
        "data.seq_len_schedule=[]",
        "data.seq_len_mix=[]",
        "data.val_fraction=0.05",
        f"data.cache_dir={root / 'cache'}",
        "model.rope.scaling.original_max_len=32",
        "train.batch_size=2",
        "train.lr=1e-3",
        "train.warmup=2",
        "train.log_every=1",
        "train.eval_every=0",
        "train.ckpt_every=0",
        "train.wandb=false",
        "train.progress=false",
    ]
    small = [
        "model.s2.block_size=16",
        "model.s2.local_blocks=2",
        "model.s2.vert_stride=2",
        "model.s2.dense_heads=1",
        "model.nsa.cmp_block=16",
        "model.nsa.cmp_stride=8",
        "model.nsa.slc_block=16",
        "model.nsa.slc_top=4",
        "model.nsa.window=32",
        "parallel.engine=torch",
    ]
    dense = [*base, "train.steps=5"]
    hybrid = [*base, *small, "parallel.cp=1", "train.steps=4", "model.layers=DSNL"]
    assert main(["train", "--config", DENSE_CFG, *dense, "parallel.cp=1", "parallel.fsdp=false",
                 f"train.run_dir={root / 'D'}"]) == 0  # fmt: skip
    assert main(["train", "--config", HYBRID_CFG, *hybrid, f"train.run_dir={root / 'DSNL'}"]) == 0
    run_many(
        [
            (root / "D-cp2", [*dense, "parallel.cp=2"], DENSE_CFG),
            # The converted stack read per shard into FSDP2 (each rank its rows; the N layer's new
            # gates and compressors set on full copies).
            (root / "DSNL-cp2", [*hybrid, "parallel.cp=2", "parallel.fsdp=true"], HYBRID_CFG),
            (
                root / "LLLD-cp2",
                [*base, *small, "train.steps=12", "model.layers=LLLD", "parallel.cp=2"],
                HYBRID_CFG,
            ),
        ],
        nproc=2,
        tmp_path=root,
    )
    return root


@pytest.mark.slow
def test_imported_model_trains_context_parallel(hf_runs):
    one, cp2 = losses(hf_runs / "D"), losses(hf_runs / "D-cp2")
    assert len(one) == len(cp2) == 5
    assert cp2 == pytest.approx(one, rel=1e-4)
    converted = losses(hf_runs / "LLLD-cp2")
    assert sum(converted[-3:]) / 3 < converted[0] - 0.1


@pytest.mark.slow
def test_converted_model_loads_per_shard_and_trains_like_one_process(hf_runs):
    one, sharded = losses(hf_runs / "DSNL"), losses(hf_runs / "DSNL-cp2")
    assert len(one) == len(sharded) == 4
    assert sharded == pytest.approx(one, rel=1e-4)


@pytest.mark.slow
def test_export_hf_loads_in_transformers(hf_runs, tmp_path):
    run = hf_runs / "D"
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "native")]) == 0
    assert main(["export", "--run", str(run), "--hf", "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.model").is_file() and not (tmp_path / "hf" / "LONGCTX.md").exists()
    from longctx.export import load_exported

    trained = load_exported(tmp_path / "native").eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    ours_again, tokenizer = load_pretrained(f"hf:{tmp_path / 'hf'}")
    assert tokenizer.vocab_size == VOCAB
    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = trained(tokens)
        assert relative(theirs(tokens).logits, want) < 1e-4
        assert relative(ours_again(tokens), want) < 1e-6


@pytest.mark.slow
def test_export_hf_of_a_converted_stack_round_trips(hf_runs, tmp_path):
    run = hf_runs / "DSNL"
    assert min(losses(run)[-2:]) < losses(run)[0]
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "native")]) == 0
    assert main(["export", "--run", str(run), "--hf", "--out", str(tmp_path / "hf")]) == 0
    note = (tmp_path / "hf" / "LONGCTX.md").read_text()
    assert "3 of 4 layers" in note and "pattern 'DSNL'" in note and "load_pretrained" in note
    from longctx.export import load_exported

    trained = load_exported(tmp_path / "native").eval()
    again, _ = load_pretrained(tmp_path / "hf")
    assert again.cfg.pattern == trained.cfg.pattern == "DSNL"
    tokens = torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert relative(again(tokens), trained(tokens)) < 1e-6
