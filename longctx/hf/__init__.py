"""Hugging Face Llama-family checkpoints in and out: Llama 2/3, Mistral and Qwen2.

    model, tokenizer = load_pretrained("hf:path/to/Llama-3-8B")             # all layers dense
    model, tokenizer = load_pretrained("hf:path/to/Llama-3-8B", layers="SSSD") # converted stack
    longctx train --config c.yaml train.init_from=hf:path/to/Llama-3-8B model.layers=LLLD

A checkpoint folder as `save_pretrained` writes it (`config.json`, `model.safetensors` or shards with
`model.safetensors.index.json`, and `tokenizer.json` or `tokenizer.model`) maps onto longctx's model
name for name: the architectures are the same decoder (RMSNorm, GQA attention with RoPE in the
rotate-half layout, SwiGLU MLP), so no tensor is permuted.

Layer conversion: `model.layers` may replace the checkpoint's dense layers. Every mixer takes the
dense layer's q/k/v/o projections (and Qwen2's q/k/v biases); what the dense layer lacks starts as
follows (see `init_converted`):

- S (S2 sparse): nothing new; the same projections attend the S2 block pattern.
- N (native sparse): `gate` (3 gates per head) starts at weight 0 and bias +4 for the selection branch,
  -4 for the compression and window branches, so the mixer starts as ~0.98 x selected-block attention
  (which is dense attention wherever every block is selected) plus small shares of the other two;
  the compressors' output matrices `w2` start at 0, so a compressed key/value is its block's mean.
- L (gated linear): `w_g` (decay), `w_og` (output gate) and `o_norm` start as in a fresh model; the
  q/k/v/o projections are the dense layer's.
- G (gated delta rule): the short convolutions on q, k and v start as the identity (the last tap 1,
  the others 0), so q, k, v are SiLU of the dense layer's projections; `w_b` (beta), the decay
  (`w_a`, `A_log`, `dt_bias`), `w_og` (output gate) and `o_norm` start as in a fresh model.

Export (`longctx export --hf`): an all-dense model becomes a folder `transformers` loads as the same
architecture. For a converted model the folder holds the same dense-named tensors plus each S/N/L/G
layer's own under `model.layers.{i}.longctx.*`, a `longctx` entry in `config.json` that
`load_pretrained` rebuilds the exact model from, and `LONGCTX.md` saying what `transformers` cannot
express.
"""

import dataclasses
import json
import math
import shutil
import warnings
from pathlib import Path

import torch

SUPPORTED = ("llama", "mistral", "qwen2")
INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
# Model keys a checkpoint fixes: a config that sets one to another value is an error.
ARCH_KEYS = (
    "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden", "norm_eps", "tie_embeddings",
    "qkv_bias",
)  # fmt: skip
# Gate bias of a converted N layer: sigmoid(4) = 0.982 on selection, sigmoid(-4) = 0.018 elsewhere.
NSA_GATE_BIAS = 4.0

_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mixer.wq.weight": "self_attn.q_proj.weight",
    "mixer.wk.weight": "self_attn.k_proj.weight",
    "mixer.wv.weight": "self_attn.v_proj.weight",
    "mixer.wq.bias": "self_attn.q_proj.bias",
    "mixer.wk.bias": "self_attn.k_proj.bias",
    "mixer.wv.bias": "self_attn.v_proj.bias",
    "mixer.wo.weight": "self_attn.o_proj.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
}


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
    from longctx.config import ConfigError

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


def _shards(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({path / name for name in weight_map.values()})
    elif (path / WEIGHTS_FILE).is_file():
        files = [path / WEIGHTS_FILE]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in path.glob("*.bin"))
        hint = (
            f" (it holds {', '.join(bins[:3])}: load it with transformers and `save_pretrained(DIR, "
            "safe_serialization=True)` to convert)"
            if bins
            else ""
        )
        raise HFCheckpointError(f"{str(path)!r} holds no safetensors weights{hint}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise HFCheckpointError(f"{str(index)!r} lists shards that are not there: {', '.join(missing[:3])}")
    return files


def hf_names(model) -> dict[str, str]:
    """`{Hugging Face tensor name: longctx parameter name}` for every parameter of `model`: the
    dense-layer tensors by their Llama names, a converted layer's own under `model.layers.{i}.longctx`."""
    names = {}
    own = dict(model.named_parameters(remove_duplicate=False))
    for ours in own:
        if ours in _TOP:
            names[_TOP[ours]] = ours
        elif ours == "output.weight":
            if not model.cfg.tie_embeddings:
                names["lm_head.weight"] = ours
        else:
            _, i, rest = ours.split(".", 2)
            if rest in _LAYER:
                names[f"model.layers.{i}.{_LAYER[rest]}"] = ours
            else:
                names[f"model.layers.{i}.longctx.{rest.removeprefix('mixer.')}"] = ours
    return names


@torch.no_grad()
def load_hf_weights(model, source: str | Path) -> list[str]:
    """Copy the checkpoint's tensors into `model` (built for `model_section(source)`, any layer
    letters) one tensor at a time; return the names of the parameters it did not hold (those of
    converted layers), which `init_converted` then sets."""
    from safetensors import safe_open

    path = hf_dir(source)
    names = hf_names(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded, unexpected = set(), []
    for shard in _shards(path):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                if key not in names:
                    if not key.endswith("rotary_emb.inv_freq"):
                        unexpected.append(key)
                    continue
                param = params[names[key]]
                view = f.get_slice(key)
                shape = list(view.get_shape())
                if shape != list(param.shape):
                    raise HFCheckpointError(
                        f"{str(shard)!r}: {key} has shape {shape} but longctx's {names[key]} "
                        f"is {list(param.shape)}; config.json and the weights disagree"
                    )
                if hasattr(param, "to_local"):
                    # A sharded (FSDP2) parameter: read only the rows this rank keeps.
                    start, stop = local_rows(param)
                    param.to_local().copy_(view[start:stop])
                else:
                    param.copy_(view[:])
                loaded.add(key)
    dense_missing = [k for k in names if k not in loaded and ".longctx." not in k]
    if unexpected or dense_missing:
        problems = []
        if dense_missing:
            problems.append(f"missing {', '.join(sorted(dense_missing)[:4])}")
        if unexpected:
            problems.append(f"unexpected {', '.join(sorted(unexpected)[:4])}")
        raise HFCheckpointError(
            f"{str(path)!r} does not match its config.json as a {'/'.join(SUPPORTED)} model: "
            f"{'; '.join(problems)}"
        )
    return sorted(names[k] for k in names if k not in loaded)


def local_rows(param) -> tuple[int, int]:
    """The rows `[start, stop)` of a dim-0-sharded DTensor parameter that this rank keeps (FSDP2's
    `torch.chunk` split, over one mesh dimension; replicated dimensions keep every row)."""
    from torch.distributed.tensor import Shard

    start, stop = 0, param.shape[0]
    for dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard):
            if placement.dim != 0:
                raise ValueError(f"expected parameters sharded on dim 0, got {param.placements}")
            parts = param.device_mesh.size(dim)
            size = -(-(stop - start) // parts)
            first = start + min(param.device_mesh.get_local_rank(dim) * size, stop - start)
            start, stop = first, min(first + size, stop)
    assert stop - start == param.to_local().shape[0], (start, stop, param.to_local().shape)
    return start, stop


@torch.no_grad()
def init_converted(model, new: list[str]) -> None:
    """Start the parameters in `new` (of converted layers) as the module docstring says."""
    new = set(new)
    for i, layer in enumerate(model.layers):
        prefix = f"layers.{i}.mixer."
        if layer.letter == "N" and f"{prefix}gate.weight" in new:
            mixer = layer.mixer
            mixer.gate.weight.zero_()
            bias = mixer.gate.bias.view(mixer.n_heads, 3)
            bias.fill_(-NSA_GATE_BIAS)
            bias[:, 1] = NSA_GATE_BIAS
            mixer.compress_k.w2.zero_()
            mixer.compress_v.w2.zero_()
        if layer.letter == "G" and f"{prefix}q_conv.weight" in new:
            for conv in (layer.mixer.q_conv, layer.mixer.k_conv, layer.mixer.v_conv):
                conv.weight.zero_()
                conv.weight[..., -1] = 1.0


def load_pretrained(
    source: str | Path,
    layers: str | None = None,
    overrides: list[str] = (),
    device: str | torch.device = "cpu",
):
    """`(model, tokenizer)` from a Hugging Face folder `hf:DIR`: the longctx `Transformer` with the
    checkpoint's weights (in fp32, eval mode) and its tokenizer (None, with a warning, when the folder
    has no tokenizer files).

    Args:
        layers: mixer letters replacing the checkpoint's dense stack (tiled to n_layers), e.g. "LLLD".
        overrides: further `model.*=value` settings, e.g. `model.rope.scaling.type=yarn`.
    """
    from longctx.config import config_from_dict
    from longctx.model import build_model

    path = hf_dir(source)
    extra = [f"model.layers={layers}"] if layers else []
    cfg = config_from_dict({"model": model_section(path)}, [*extra, *overrides]).model
    model = build_model(cfg, device)
    init_converted(model, load_hf_weights(model, path))
    model.eval()
    tokenizer = None
    if has_tokenizer(path):
        from longctx.tokenizer import open_tokenizer

        tokenizer = open_tokenizer(path)
    else:
        warnings.warn(
            f"{str(path)!r} has no tokenizer.json or tokenizer.model: the tokenizer is None; encode text "
            "with the tokenizer the checkpoint was trained with",
            stacklevel=2,
        )
    return model, tokenizer


def hf_config(
    model_cfg, max_len: int, eos_id: int | None = None, bos_id: int | None = None
) -> tuple[dict, list]:
    """`config.json` for `model_cfg` as a Llama, Mistral (a sliding window) or Qwen2 (q/k/v biases)
    model, and the list of what it cannot express (empty for an all-dense model)."""
    notes = []
    kind = "qwen2" if model_cfg.qkv_bias else "mistral" if model_cfg.dense_window else "llama"
    if model_cfg.qkv_bias and model_cfg.dense_window:
        notes.append(
            f"D layers use a sliding window of {model_cfg.dense_window} tokens, which Qwen2 cannot express"
        )
    scaling = model_cfg.rope.scaling
    theta = model_cfg.rope.theta
    rope_scaling = None
    if scaling.type == "ntk":
        # Static NTK scaling is plain RoPE with a larger base.
        theta = theta * scaling.factor ** (model_cfg.head_dim / (model_cfg.head_dim - 2))
    elif scaling.type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": scaling.factor}
    elif scaling.type == "yarn":
        rope_scaling = {
            "rope_type": "yarn",
            "factor": scaling.factor,
            "original_max_position_embeddings": scaling.original_max_len,
            "beta_fast": scaling.beta_fast,
            "beta_slow": scaling.beta_slow,
        }
    elif scaling.type == "llama3":
        rope_scaling = {
            "rope_type": "llama3",
            "factor": scaling.factor,
            "original_max_position_embeddings": scaling.original_max_len,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
        }
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[kind]
    config = {
        "architectures": [arch],
        "model_type": kind,
        "vocab_size": model_cfg.vocab_size,
        "hidden_size": model_cfg.dim,
        "intermediate_size": model_cfg.hidden_dim,
        "num_hidden_layers": model_cfg.n_layers,
        "num_attention_heads": model_cfg.n_heads,
        "num_key_value_heads": model_cfg.kv_heads,
        "head_dim": model_cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": model_cfg.norm_eps,
        "tie_word_embeddings": model_cfg.tie_embeddings,
        "max_position_embeddings": max_len,
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "torch_dtype": "float32",
    }
    if kind == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    if kind == "mistral":
        config["sliding_window"] = model_cfg.dense_window
    if kind == "qwen2":
        config.update(use_sliding_window=False, sliding_window=None)
    if eos_id is not None and eos_id >= 0:
        config["eos_token_id"] = eos_id
    if bos_id is not None and bos_id >= 0:
        config["bos_token_id"] = bos_id
    converted = [(i, letter) for i, letter in enumerate(model_cfg.pattern) if letter != "D"]
    if converted:
        letters = "".join(sorted({letter for _, letter in converted}))
        notes.append(
            f"{len(converted)} of {model_cfg.n_layers} layers are not dense softmax attention (pattern "
            f"{model_cfg.pattern!r}, letters {letters}); transformers would run them as dense attention with "
            "the same q/k/v/o weights and ignore their own parameters (model.layers.N.longctx.*), which is "
            "a different model: load this folder with longctx.hf.load_pretrained"
        )
        config["longctx"] = {"model": dataclasses.asdict(model_cfg)}
    return config, notes


def write_hf(
    weights: dict[str, torch.Tensor], model_cfg, meta: dict, out: Path, checkpoint: Path | None
) -> None:
    """The `--hf` exporter: `config.json`, `model.safetensors` by Hugging Face names, the run's
    tokenizer files, and `LONGCTX.md` when transformers cannot express the model."""
    from safetensors.torch import save_file

    from longctx.model import Transformer

    with torch.device("meta"):
        skeleton = Transformer(model_cfg)
    names = hf_names(skeleton)
    tensors = {hf: weights[ours].detach().to("cpu").contiguous().clone() for hf, ours in names.items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt", "step": str(meta.get("step", ""))})
    run = checkpoint.parent.parent if checkpoint is not None else None
    eos = bos = None
    if run is not None:
        for name in TOKENIZER_FILES:
            if (run / name).is_file():
                shutil.copyfile(run / name, out / name)
        if has_tokenizer(out):
            from longctx.tokenizer import open_tokenizer

            tok = open_tokenizer(out)
            eos, bos = tok.eos_id, tok.bos_id
    max_len = int(meta.get("config", {}).get("data", {}).get("seq_len", 0) or 0)
    scaling = model_cfg.rope.scaling
    if scaling.type != "none":
        max_len = max(max_len, int(scaling.original_max_len * scaling.factor))
    config, notes = hf_config(model_cfg, max_len or 4096, eos, bos)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    note = out / "LONGCTX.md"
    if notes:
        lines = ["# What transformers cannot express in this export", ""]
        lines += [f"- {n}" for n in notes]
        note.write_text("\n".join(lines) + "\n")
    elif note.exists():
        note.unlink()
