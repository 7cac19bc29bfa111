"""Export a checkpoint's weights for use outside training: full (unsharded) tensors plus the model config.

    longctx export --run runs/tiny --out exported/            # the run's latest checkpoint
    longctx export --run runs/tiny --checkpoint step_0000100 --out exported/
    longctx export --run runs/tiny --out exported/ --force  # replace an earlier export there

    model = load_exported("exported/")                       # a Transformer with those weights

`native` format (the default): `model.safetensors` (every parameter by its longctx name, fp32 as
trained) and `config.json` (the `model` section of the run's config). `hf` format (`--hf`): a
Hugging Face Llama/Mistral/Qwen2 folder with the run's tokenizer (`longctx.hf.write_hf`). Formats are
entries of `EXPORTERS`, each a function `(weights, model_cfg, meta, out_dir, checkpoint)`.

An export is written to a temporary folder next to `--out` and renamed into place when complete, so
`--out` holds either nothing or a whole export. `--out` must be new or empty; `--force` replaces what
is there.
"""

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from longctx.config import ModelConfig, config_from_dict
from longctx.train.checkpoint import read_meta
from longctx.weights import WEIGHTS_FILE, check_weights, load_weights, read_weights

CONFIG_FILE = "config.json"


def write_native(
    weights: dict[str, torch.Tensor], model_cfg: ModelConfig, meta: dict, out: Path, checkpoint: Path
) -> None:
    from safetensors.torch import save_file

    # Tied weights share storage, which safetensors refuses: every tensor gets its own copy.
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in weights.items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt", "step": str(meta["step"])})
    (out / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model_cfg), indent=2) + "\n")


def write_hf(weights, model_cfg, meta, out, checkpoint) -> None:
    from longctx.hf.export import write_hf as write

    write(weights, model_cfg, meta, out, checkpoint)


EXPORTERS = {"native": write_native, "hf": write_hf}


def check_out_dir(out: Path, force: bool) -> None:
    """`out` may be written: it does not exist, or is an empty folder, or `force` replaces it."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ValueError(f"--out {str(out)!r} is a file, not a folder; give a folder to write the export to")
    if out.is_dir() and not force:
        held = sorted(p.name for p in out.iterdir())
        if held:
            listed = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
            raise ValueError(
                f"--out {str(out)!r} is not empty (it holds {listed}); give a new folder, or add --force to "
                "replace it and everything in it"
            )


def export_checkpoint(checkpoint: Path, out: str | Path, fmt: str = "native", force: bool = False) -> Path:
    """Write checkpoint `checkpoint`'s weights to a new directory `out` in format `fmt`; return `out`.
    `out` must not exist or be empty; `force` replaces it."""
    if fmt not in EXPORTERS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORTERS)}")
    out = Path(out)
    check_out_dir(out, force)
    meta = read_meta(checkpoint)
    model_cfg = config_from_dict({"model": meta["config"]["model"]}).model
    weights = read_weights(checkpoint)
    check_weights(
        weights, meta["params"], f"checkpoint {str(checkpoint)!r}",
        "the checkpoint is damaged: its stored weights differ from the parameters its meta.json lists",
    )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        EXPORTERS[fmt](weights, model_cfg, meta, tmp, checkpoint)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        check_out_dir(out, force)
        old = None
        if out.is_dir():
            old = out.with_name(f"{tmp.name}.old")
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)
    return out


def load_exported(path: str | Path, device: str | torch.device = "cpu"):
    """The model a `native` export describes, with its weights (nothing is unpickled)."""
    from longctx.model import build_model

    path = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{str(path / name)!r} not found; is {str(path)!r} a `longctx export` directory?"
            )
    model_cfg = config_from_dict({"model": json.loads((path / CONFIG_FILE).read_text())}).model
    model = build_model(model_cfg, device)
    load_weights(model, path / WEIGHTS_FILE, f"the export's {CONFIG_FILE} and {WEIGHTS_FILE} disagree")
    return model
