import pytest

from longctx.config import ConfigError, config_from_dict, load_config, save_config


def test_tiny_config_loads_with_overrides():
    cfg = load_config("configs/tiny.yaml", ["model.layers=LLLS", "model.n_layers=8", "train.lr=1e-3"])
    assert cfg.model.pattern == "LLLSLLLS"
    assert cfg.train.lr == pytest.approx(1e-3)  # "1e-3" is a string to YAML 1.1; coerced to float


def test_unknown_key_names_nearest():
    with pytest.raises(ConfigError, match=r"'model\.layrs'.*did you mean 'model\.layers'"):
        load_config("configs/tiny.yaml", ["model.layrs=D"])
    with pytest.raises(ConfigError, match=r"'trian'.*did you mean 'train'"):
        config_from_dict({"trian": {"steps": 3}})


def test_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError, match=r"train\.steps: expected int, got 'many'"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"parallel\.cp_comm: expected 'ring' \| 'ulysses' \| 'allgather'"):
        load_config(None, ["parallel.cp_comm=rign"])
    with pytest.raises(ConfigError, match=r"model\.dim: expected int, got 12\.5"):
        load_config(None, ["model.dim=12.5"])


def test_bad_layer_letter_is_named():
    with pytest.raises(ConfigError, match=r"unknown mixer letter 'X' in 'DXL'"):
        load_config(None, ["model.layers=DXL"])


def test_section_validation():
    with pytest.raises(ConfigError, match=r"model\.dim.*n_heads=3"):
        load_config(None, ["model.dim=128", "model.n_heads=3"])
    with pytest.raises(ConfigError, match=r"model\.n_kv_heads"):
        load_config(None, ["model.n_heads=8", "model.n_kv_heads=3"])
    with pytest.raises(ConfigError, match=r"override 'train\.steps' is not of the form"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")


def test_seq_len_must_split_under_cp_and_lists_working_values():
    with pytest.raises(ConfigError, match=r"data\.seq_len: 1000 .* multiple of 128"):
        load_config(None, ["model.layers=S", "model.s2.block_size=32", "parallel.cp=2", "data.seq_len=1000"])
    cfg = load_config(
        None, ["model.layers=S", "model.s2.block_size=32", "parallel.cp=2", "data.seq_len=1024"]
    )
    assert cfg.model.block_multiple() == 32


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["model.rope.scaling.type=yarn", "model.rope.scaling.factor=4"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
