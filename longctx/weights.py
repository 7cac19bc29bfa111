"""Model weights by name: find a training checkpoint or an export, read it, check it fits, load it.

    path = find_checkpoint(run_dir, "step_0000100")            # a training checkpoint (or the latest)
    path = find_weights(run_dir, None)                          # RUN/model.safetensors, else the latest
    model, cfg, tokenizer = load_model_for_eval(run_dir)         # a trained run, ready to evaluate
    load_weights(model, path, fix="use the run's own config")   # names and shapes checked first
    check_weights(saved_shapes, model_shapes, "checkpoint 'x'", fix="...")

Used by training (`train.init_from`, resuming), evaluation (`--checkpoint`) and `longctx export`.
A checkpoint is read through `longctx.train.checkpoint.full_weights` (either engine, unsharded, no
code unpickled); a `model.safetensors` file or a folder holding one (a `native` export) through
safetensors.
"""

from pathlib import Path

import torch

from longctx.train.checkpoint import CHECKPOINTS, full_weights, param_shapes, resolve_checkpoint

WEIGHTS_FILE = "model.safetensors"


def find_checkpoint(
    run: str | Path | None, checkpoint: str | Path | None, what: str = "--checkpoint"
) -> Path:
    """A complete training checkpoint: `checkpoint` (a path, or a name inside `run/checkpoints/`),
    else the latest good one of run directory `run`. `what` names the setting, for error messages."""
    if checkpoint:
        path = Path(checkpoint)
        if run and not path.exists() and (Path(run) / CHECKPOINTS / path).exists():
            path = Path(run) / CHECKPOINTS / path
        return resolve_checkpoint(path, what)
    if not run:
        raise ValueError("give --run RUN_DIR (its latest checkpoint) or --checkpoint PATH")
    return resolve_checkpoint(run, "--run")


def find_weights(run: str | Path | None, checkpoint: str | Path | None = None) -> Path:
    """The weights to evaluate: `checkpoint` (a `model.safetensors` file, an export folder holding one,
    a training checkpoint or its name inside `run/checkpoints/`); without it `run/model.safetensors`
    if the run holds exported weights, else the run's latest checkpoint."""
    if not checkpoint:
        if run is not None and (Path(run) / WEIGHTS_FILE).is_file():
            return Path(run) / WEIGHTS_FILE
        return find_checkpoint(run, None)
    path = Path(checkpoint)
    if not path.exists() and run is not None and (Path(run) / CHECKPOINTS / path).exists():
        path = Path(run) / CHECKPOINTS / path
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} not found; give a {WEIGHTS_FILE} file, an export folder, or a "
            "training checkpoint (RUN/checkpoints/step_NNNNNNN)"
        )
    if path.is_file() and path.suffix == ".safetensors":
        return path
    if path.is_dir() and (path / WEIGHTS_FILE).is_file():
        return path / WEIGHTS_FILE
    return resolve_checkpoint(path, "--checkpoint")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors on the CPU by parameter name, from a `.safetensors` file or a training
    checkpoint (as `find_weights` or `find_checkpoint` returns them)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return full_weights(path)


def check_weights(saved: dict, expected: dict, source: str, fix: str, optional=()) -> None:
    """Raise a ValueError if `saved` (`{name: shape or tensor}`) does not hold exactly the parameters
    `expected` (`{name: shape}`), naming the first one missing, of another shape or unexpected.
    Names in `optional` may be absent (a tied LM head stored once). `fix` ends the message."""
    shapes = {name: list(getattr(value, "shape", value)) for name, value in saved.items()}
    missing = [name for name in expected if name not in shapes and name not in optional]
    if missing:
        name = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(
            f"{source} does not fit this model: it is missing parameter {name!r} (shape "
            f"{list(expected[name])}){more}; {fix}"
        )
    for name, shape in expected.items():
        if name in shapes and shapes[name] != list(shape):
            raise ValueError(
                f"{source} does not fit this model: parameter {name!r} has shape {shapes[name]} in the "
                f"checkpoint but {list(shape)} in the model; {fix}"
            )
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise ValueError(
            f"{source} does not fit this model: it holds parameter {extra[0]!r} (shape {shapes[extra[0]]}) "
            f"that the model lacks; {fix}"
        )


@torch.no_grad()
def load_weights(model: torch.nn.Module, path: str | Path, fix: str, source: str | None = None) -> None:
    """Copy the weights at `path` (see `read_weights`) into `model` after `check_weights`; `fix` says
    how to get a fitting checkpoint, `source` names it in messages (default: the path)."""
    tensors = read_weights(path)
    optional = {"output.weight"} if getattr(model.cfg, "tie_embeddings", False) else set()
    check_weights(tensors, param_shapes(model), source or f"{str(path)!r}", fix, optional)
    own = model.state_dict()
    for name, tensor in tensors.items():
        own[name].copy_(tensor)


# How to get weights that fit when evaluating a run.
EVAL_FIX = (
    "evaluate with the run's own config.yaml (overrides may change only what has no weights, such as "
    "model.rope)"
)


def load_model_for_eval(run_dir: str | Path, checkpoint: str | Path | None = None, overrides=()):
    """The run's model with its trained weights, in eval mode, its config and its tokenizer.

    Args:
        run_dir: the training run directory (`config.yaml`, `tokenizer.model` or `tokenizer.json`).
        checkpoint: weights to load (see `find_weights`; default the run's own).
        overrides: `key.sub=value` changes to the run's config (e.g. `model.rope.scaling.type=yarn`).

    Returns:
        `(model, cfg, tokenizer)`.
    """
    from longctx.config import load_config
    from longctx.model import build_model
    from longctx.tokenizer import find_tokenizer_file, open_tokenizer

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{str(run / 'config.yaml')!r} not found: --run must name a training run directory"
        )
    found = find_tokenizer_file(run)
    if found is None:
        raise FileNotFoundError(
            f"{str(run)!r} holds no tokenizer.model or tokenizer.json; training keeps a copy of its "
            "tokenizer in the run directory: copy it there again"
        )
    tokenizer = open_tokenizer(found)
    cfg = load_config(run / "config.yaml", [*overrides, f"data.tokenizer={found}"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, device)
    load_weights(model, find_weights(run, checkpoint), EVAL_FIX)
    model.eval()
    return model, cfg, tokenizer
