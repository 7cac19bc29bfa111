"""Map a Hugging Face `config.json` onto longctx's `model` config section (and back in `export.py`).

    section = model_section("hf:path/to/Llama-3-8B")        # the `model` section, a dict
    cfg = load_config("configs/llama3-8b-128k.yaml", ["train.init_from=hf:path/to/Llama-3-8B"])

`load_config` resolves `train.init_from=hf:DIR` before the config is built: the checkpoint's
architecture replaces the config file's, and its tokenizer becomes `data.tokenizer`.
`longctx.config` knows nothing of Hugging Face; the command line loads configs through here.
"""

import json
import math
import warnings
from pathlib import Path

from longctx.config import Config, ConfigError, config_from_dict, parse_overrides, read_config_file

SUPPORTED = ("llama", "mistral", "qwen2")

# Model keys a checkpoint fixes: a config that sets one to another value is an error.
ARCH_KEYS = (
    "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden", "norm_eps", "tie_embeddings",
    "qkv_bias",
)  # fmt: skip


class HFCheckpointError(ValueError):
    """A Hugging Face folder longctx cannot import; the message says what and how to fix it."""


def hf_dir(source: str | Path) -> Path:
    """The folder of `hf:DIR` (or `DIR`), checked to hold a `config.json`."""
    text = str(source)
    path = Path(text[3:] if text.startswith("hf:") else text)
    if not (path / "config.json").is_file():
        raise HFCheckpointError(
            f"{text!r}: no config.json in {str(path)!r}; give a folder as transformers' save_pretrained "
            "writes it (config.json + *.safetensors), e.g. from `hf download MODEL --local-dir DIR`"
        )
    return path


def read_hf_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise HFCheckpointError(f"{str(path / 'config.json')!r} is not valid JSON: {e}") from e


def _rope_section(hf: dict, path: Path) -> dict:
    # transformers >= 5 writes `rope_parameters` (theta inside); older versions `rope_theta` and
    # `rope_scaling`.
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if not params:
        params = dict(hf.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    where = f"{str(path / 'config.json')!r}"
    if kind == "default":
        return {"theta": float(theta)}
    factor = float(params.get("factor", 1.0))
    original = params.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
    scaling = {"factor": factor}
    if kind == "linear":
        scaling["type"] = "linear"
    elif kind == "yarn":
        scaling.update(type="yarn", original_max_len=int(original))
        scaling.update({k: float(params[k]) for k in ("beta_fast", "beta_slow") if params.get(k) is not None})
        default_attn = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if params.get(key) not in (None, 1.0, 0.0) and not (
                key == "attention_factor" and abs(params[key] - default_attn) < 1e-9
            ):
                raise HFCheckpointError(
                    f"{where}: yarn with {key}={params[key]} is not supported (longctx scales q and k by "
                    "0.1 ln(factor) + 1, YaRN's default)"
                )
    elif kind == "llama3":
        scaling.update(
            type="llama3",
            original_max_len=int(original),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        )
    else:
        raise HFCheckpointError(
            f"{where}: RoPE type {kind!r} is not supported; longctx imports default, linear, yarn and llama3 "
            "RoPE (set model.rope.scaling afterwards to extend the context)"
        )
    return {"theta": float(theta), "scaling": scaling}


def model_section(source: str | Path) -> dict:
    """The `model` config section (a dict) describing the checkpoint at `source` (`hf:DIR` or `DIR`).

    A folder written by `longctx export --hf` from a converted model carries its exact longctx model
    config, which is returned as it is.
    """
    path = hf_dir(source)
    hf = read_hf_config(path)
    if isinstance(hf.get("longctx"), dict) and isinstance(hf["longctx"].get("model"), dict):
        return json.loads(json.dumps(hf["longctx"]["model"]))
    where = f"{str(path / 'config.json')!r}"
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise HFCheckpointError(
            f"{where}: model_type {kind!r} is not supported; longctx imports {', '.join(SUPPORTED)} "
            "(Llama 2/3, Mistral, Qwen2)"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise HFCheckpointError(f"{where}: hidden_act {hf['hidden_act']!r}; longctx's MLP is SwiGLU (silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise HFCheckpointError(
            f"{where}: attention_bias/mlp_bias are set; longctx's layers have biases only on q/k/v (Qwen2)"
        )
    dim, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    if hf.get("head_dim") not in (None, dim // heads):
        raise HFCheckpointError(
            f"{where}: head_dim {hf['head_dim']} differs from hidden_size / num_attention_heads = "
            f"{dim // heads}; longctx's attention needs head_dim = dim / n_heads"
        )
    window = None
    if kind == "mistral":
        window = hf.get("sliding_window")
    elif kind == "qwen2" and hf.get("use_sliding_window"):
        raise HFCheckpointError(
            f"{where}: Qwen2 with use_sliding_window=true (windows on some layers only) is not supported"
        )
    return {
        "vocab_size": int(hf["vocab_size"]),
        "dim": dim,
        "n_layers": int(hf["num_hidden_layers"]),
        "n_heads": heads,
        "n_kv_heads": int(hf.get("num_key_value_heads") or heads),
        "mlp_hidden": int(hf["intermediate_size"]),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "qkv_bias": kind == "qwen2",
        "layers": "D",
        "dense_window": int(window) if window else None,
        "rope": _rope_section(hf, path),
    }


def merge_model_section(tree: dict, source: str, overrides: dict | None = None) -> list[str]:
    """Make config `tree` (a config file's dict, before its command-line `overrides` `{dotted key:
    value}` are applied) describe the checkpoint `source` (`hf:DIR`); return what it replaced.

    The checkpoint's architecture keys and RoPE theta replace the file's (a config written for another
    model still works; the returned notes say what changed); an override that contradicts them is an
    error naming both values. RoPE scaling and the sliding window come from the checkpoint unless the
    config sets them, the tokenizer becomes `data.tokenizer` unless one is set.
    """

    overrides = overrides or {}
    model = tree.get("model") or {}
    text = str(source)
    if not Path(text[3:]).exists() and all(k in model for k in ARCH_KEYS):
        # A run's saved config.yaml describes the model fully; the checkpoint may be gone by now.
        return []
    try:
        hf = model_section(source)
    except HFCheckpointError as e:
        raise ConfigError(f"train.init_from: {e}") from e
    for key in ARCH_KEYS:
        value = overrides.get(f"model.{key}")
        if value is not None and value != hf[key]:
            raise ConfigError(
                f"model.{key}={value!r} contradicts {source}, which has {hf[key]!r}; an imported model takes "
                "its architecture from the checkpoint: drop the override"
            )
    tree["model"] = model
    replaced = []
    for key in ARCH_KEYS:
        if model.get(key) is not None and model[key] != hf[key]:
            replaced.append(f"model.{key} {model[key]!r} -> {hf[key]!r}")
        model[key] = hf[key]
    for key in ("layers", "dense_window", "s2", "nsa", "linear"):
        if key not in model and key in hf:
            model[key] = hf[key]
    rope = model.get("rope") or {}
    model["rope"] = rope
    if rope.get("theta") not in (None, hf["rope"]["theta"]):
        replaced.append(f"model.rope.theta {rope['theta']!r} -> {hf['rope']['theta']!r}")
    rope["theta"] = hf["rope"]["theta"]
    scaling_set = "scaling" in rope or any(k.startswith("model.rope.scaling.") for k in overrides)
    if not scaling_set and "scaling" in hf["rope"]:
        rope["scaling"] = dict(hf["rope"]["scaling"])
    elif "model.rope.scaling.original_max_len" not in overrides and "original_max_len" not in (
        rope.get("scaling") or {}
    ):
        # The config's own scaling replaces the checkpoint's; it extends from the trained length.
        trained = read_hf_config(hf_dir(source)).get("max_position_embeddings")
        if trained:
            rope["scaling"] = {**(rope.get("scaling") or {}), "original_max_len": int(trained)}
    data = tree.get("data") or {}
    tree["data"] = data
    if not data.get("tokenizer") and not overrides.get("data.tokenizer"):
        path = hf_dir(source)
        if not has_tokenizer(path):
            raise ConfigError(
                f"data.tokenizer: {source} has no tokenizer.json or tokenizer.model, and the model must "
                "see the token ids it was trained with; set data.tokenizer to its tokenizer (a folder, a "
                "tokenizer.json or a SentencePiece .model)"
            )
        data["tokenizer"] = str(path)
    return replaced


def has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))


def resolve_init_from(tree: dict, overrides: list[str]) -> dict:
    """Config `tree` (a config file's dict) made to describe the checkpoint of `train.init_from=hf:DIR`
    (from `overrides` or the tree), warning about what it replaced; unchanged for any other init_from."""
    pairs = dict(parse_overrides(list(overrides)))
    init_from = pairs.get("train.init_from", (tree.get("train") or {}).get("init_from"))
    if isinstance(init_from, str) and init_from.startswith("hf:"):
        replaced = merge_model_section(tree, init_from, pairs)
        if replaced:
            warnings.warn(
                f"train.init_from={init_from} sets the architecture; replaced the config file's "
                + ", ".join(replaced),
                stacklevel=3,
            )
    return tree


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """`longctx.config.load_config` with `train.init_from=hf:DIR` resolved first (see
    `merge_model_section`): what the command line uses to load a config."""
    tree = resolve_init_from(read_config_file(path), overrides)
    return config_from_dict(tree, overrides)


def check_architecture(model_cfg, source: str) -> None:
    """Raise a ConfigError if `model_cfg` does not have the architecture of checkpoint `source`
    (`hf:DIR`): its config was built without `load_config` resolving `train.init_from`."""
    hf = model_section(source)
    wrong = [key for key in ARCH_KEYS if getattr(model_cfg, key) != hf[key]]
    if wrong:
        key = wrong[0]
        raise ConfigError(
            f"model.{key}={getattr(model_cfg, key)!r} but train.init_from={source} has {hf[key]!r}; load the "
            "config with longctx.hf.load_config (as the `longctx` command does), which takes the "
            "architecture from the checkpoint"
        )
