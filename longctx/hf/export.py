"""`longctx export --hf`: a model as a Hugging Face Llama/Mistral/Qwen2 folder.

    write_hf(weights, model_cfg, meta, out_dir, checkpoint)

An all-dense model becomes a folder `transformers` loads as the same architecture; a converted one
also carries its own tensors and exact config (see `longctx.hf`) and a `LONGCTX.md` note.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from longctx.hf.config import has_tokenizer
from longctx.hf.weights import WEIGHTS_FILE, hf_names

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


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
