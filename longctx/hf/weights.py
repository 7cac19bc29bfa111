"""Hugging Face checkpoint tensors into a longctx model, by name, one tensor (or one shard's rows) at
a time.

    missing = load_hf_weights(model, "hf:path/to/Llama-3-8B")   # parameters it did not hold

Every tensor maps onto longctx's parameter of the same role (`hf_names`); no tensor is permuted.
"""

import json
from pathlib import Path

import torch

from longctx.hf.config import SUPPORTED, HFCheckpointError, hf_dir

INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"

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
    return converted_params(path, names, loaded, unexpected)


def converted_params(path, names: dict, loaded: set, unexpected: list) -> list[str]:
    """After loading checkpoint `path`: an HFCheckpointError if it lacked a tensor of a dense layer or
    held one the model has no place for; else the longctx names of the parameters it did not hold
    (those of converted layers, which `init_converted` sets)."""
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
