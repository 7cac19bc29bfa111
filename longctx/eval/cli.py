"""`longctx eval niah` and `longctx eval ppl`: evaluate a trained run directory.

    longctx eval niah --run runs/demo-pretrain --lengths 256,512 --depths 0,0.25,0.5,0.75,1 --samples 20
    longctx eval niah --run RUN --lengths 512 model.rope.scaling.type=linear model.rope.scaling.factor=2
    longctx eval ppl --run runs/demo-pretrain --seq-len 512 --batches 8
    longctx eval ppl --compare runs/demo-pretrain runs/demo-continue --lengths 256,512
    longctx eval ruler --run runs/demo-continue --lengths 256,512 --tasks niah_multikey,vt --samples 8

The model is rebuilt from `RUN/config.yaml` (plus any `key=value` overrides, e.g. a RoPE scaling to
try) with the run's tokenizer (`RUN/tokenizer.model` or `tokenizer.json`), and its weights come from
`--checkpoint` (default: the run's own, see `default_checkpoint`). Results go to `--out` (default
`RUN/niah`, `RUN/ppl`, `RUN/ruler`) and the console. Options left out take their value from the run's `eval`
section (`eval.lengths`, `eval.depths`, `eval.samples`, `eval.batch_size`) and `data.passkey_digits`.
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from longctx.config import Config, load_config

WEIGHTS_FILE = "model.safetensors"


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_run_args(p: argparse.ArgumentParser, run_required: bool = True) -> None:
    # `--run-dir` too: under torchrun, whose own parser takes `--run` for its `--run-path`.
    p.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        required=run_required,
        help="run directory (holds config.yaml and its tokenizer); spell it --run-dir under torchrun",
    )
    p.add_argument(
        "--checkpoint",
        help=f"a training checkpoint (path, or name in RUN/checkpoints/), a {WEIGHTS_FILE} file or an "
        "export folder; default: the run's latest checkpoint",
    )
    p.add_argument("--out", help="output folder (default RUN/niah or RUN/ppl)")
    p.add_argument("--batch-size", type=int, help="samples per forward pass (default eval.batch_size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for the model")


def add_eval_parsers(sub) -> None:
    """Register `eval niah` and `eval ppl` on the top-level CLI's subparsers."""
    ev = sub.add_parser("eval", help="evaluate a trained run").add_subparsers(dest="action", required=True)
    p = ev.add_parser("niah", help="needle-in-a-haystack passkey retrieval by length and depth")
    _add_run_args(p)
    p.add_argument("--lengths", type=_int_list, help="context lengths, e.g. 512,1024 (default eval.lengths)")
    p.add_argument("--depths", type=_float_list, help="needle depths in [0, 1] (default eval.depths)")
    p.add_argument("--samples", type=int, help="samples per length and depth (default eval.samples)")
    p.add_argument("--digits", type=int, help="passkey digits (default data.passkey_digits)")
    p.add_argument("--seed", type=int, default=0, help="sample seed (default 0)")
    p.add_argument("--haystack", help="a text file to use as the haystack (default: the run's corpus)")
    p.set_defaults(func=cmd_niah)

    p = ev.add_parser(
        "ruler", help="RULER-style tasks (needles, multi-hop, aggregation) by greedy generation"
    )
    _add_run_args(p)
    p.add_argument("--tasks", default="all", help="all (default) or comma-separated task names")
    p.add_argument("--lengths", type=_int_list, help="prompt lengths, e.g. 4096,8192 (default eval.lengths)")
    p.add_argument("--depths", type=_float_list, help="needle depths in [0, 1] (default eval.depths)")
    p.add_argument("--samples", type=int, help="samples per task, length and depth (default eval.samples)")
    p.add_argument("--seed", type=int, default=0, help="sample seed (default 0)")
    p.add_argument(
        "--haystack", help="a text file to draw haystacks and words from (default: the run's corpus)"
    )
    p.set_defaults(func=cmd_ruler)

    p = ev.add_parser(
        "lm-eval",
        help="lm-evaluation-harness with the `longctx` model registered: longctx eval lm-eval -- ARGS",
        description="Runs `lm_eval ARGS` with --model longctx available (--model_args run=RUN,...). "
        "--make-tasks DIR writes local tasks made from the built-in corpus (use --include_path DIR).",
    )
    p.add_argument("--make-tasks", metavar="DIR", help="write the local corpus tasks into DIR and exit")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments for lm_eval, after --")
    p.set_defaults(func=cmd_lm_eval)

    p = ev.add_parser("ppl", help="validation perplexity by position bucket")
    _add_run_args(p, run_required=False)
    p.add_argument("--seq-len", type=int, help="tokens per sample (default data.seq_len)")
    p.add_argument("--lengths", type=_int_list, help="several lengths, e.g. 256,512 (instead of --seq-len)")
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("RUN_A", "RUN_B"),
        help="two runs side by side at each length (e.g. before and after extension), instead of --run",
    )
    p.add_argument("--batches", type=int, default=8, help="batches to average (default 8)")
    p.add_argument("--buckets", type=int, default=8, help="position buckets (default 8)")
    p.set_defaults(func=cmd_ppl)


def default_checkpoint(run_dir: Path) -> Path:
    """The weights a run's evaluation uses when `--checkpoint` is not given: `RUN/model.safetensors`
    if the run holds exported weights, else its latest complete training checkpoint."""
    from longctx.train.checkpoint import resolve_checkpoint

    if (Path(run_dir) / WEIGHTS_FILE).is_file():
        return Path(run_dir) / WEIGHTS_FILE
    return resolve_checkpoint(run_dir, "--run")


def check_weights(model: torch.nn.Module, tensors: dict, source: str) -> None:
    """Raise a ValueError naming the first mismatch if `tensors` are not exactly `model`'s parameters."""
    own = model.state_dict()
    # A tied LM head is stored once, under the embedding's name.
    tied = {"output.weight"} if model.cfg.tie_embeddings else set()
    missing = sorted(set(own) - set(tensors) - tied)
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{source!r} does not match the model of this config: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; evaluate with the run's own config.yaml (overrides may change only "
            "what has no weights, such as model.rope)"
        )
    for name, tensor in tensors.items():
        if tensor.shape != own[name].shape:
            raise ValueError(
                f"{source!r}: parameter {name!r} has shape {tuple(tensor.shape)} in the file but "
                f"{tuple(own[name].shape)} in the model; check the run's config and overrides"
            )


def load_safetensors_weights(model: torch.nn.Module, path: Path) -> None:
    """Copy `path`'s tensors into `model`, checking every name and shape first."""
    from safetensors.torch import load_file

    tensors = load_file(str(path), device="cpu")
    check_weights(model, tensors, str(path))
    with torch.no_grad():
        own = model.state_dict()
        for name, tensor in tensors.items():
            own[name].copy_(tensor)


def load_checkpoint_weights(
    model: torch.nn.Module, path: str | Path, run_dir: str | Path | None = None
) -> None:
    """Load weights from a `model.safetensors` file, a folder holding one (`longctx export`), a
    training checkpoint folder (either engine), or its name inside `run_dir/checkpoints/`."""
    from longctx.train.checkpoint import CHECKPOINTS, full_weights, resolve_checkpoint

    path = Path(path)
    if not path.exists() and run_dir is not None and (Path(run_dir) / CHECKPOINTS / path).exists():
        path = Path(run_dir) / CHECKPOINTS / path
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} not found; give a {WEIGHTS_FILE} file, an export folder, or a "
            "training checkpoint (RUN/checkpoints/step_NNNNNNN)"
        )
    if path.is_file() and path.suffix == ".safetensors":
        load_safetensors_weights(model, path)
    elif path.is_dir() and (path / WEIGHTS_FILE).is_file():
        load_safetensors_weights(model, path / WEIGHTS_FILE)
    else:
        weights = full_weights(resolve_checkpoint(path, "--checkpoint"))
        check_weights(model, weights, str(path))
        with torch.no_grad():
            own = model.state_dict()
            for name, tensor in weights.items():
                own[name].copy_(tensor)


def load_model_for_eval(run_dir: str | Path, checkpoint: str | Path | None = None, overrides=()):
    """The run's model with its trained weights, in eval mode, its config and its tokenizer.

    Args:
        run_dir: the training run directory (`config.yaml`, `tokenizer.model` or `tokenizer.json`).
        checkpoint: weights to load (default `default_checkpoint(run_dir)`).
        overrides: `key.sub=value` changes to the run's config (e.g. `model.rope.scaling.type=yarn`).

    Returns:
        `(model, cfg, tokenizer)`.
    """
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
    load_checkpoint_weights(model, checkpoint if checkpoint else default_checkpoint(run), run)
    model.eval()
    return model, cfg, tokenizer


def text_documents(path: str | Path, tokenizer):
    """A text file as one tokenized document (`TokenDocuments`), to serve as a haystack."""
    from longctx.data.indexed import TokenDocuments

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"haystack file {str(path)!r} not found")
    ids = np.asarray(tokenizer.encode(path.read_text()), dtype=np.int64)
    return TokenDocuments(str(path), ids, np.zeros(1, dtype=np.int64), np.array([len(ids)], dtype=np.int64))


def _prepared(cfg: Config, tokenizer, progress: bool):
    from longctx.data import prepare_dataset

    return prepare_dataset(cfg, tokenizer, progress=progress)


def _distributed_eval(model, cfg: Config, lengths: list[int], whole_blocks: bool = True):
    """Under torchrun: process groups from `parallel.cp` (the other processes split the samples),
    the model made context-parallel, and the `forward`, `shard` and `reduce` for `evaluate_niah`
    (`whole_blocks`: lengths must split into 2 x cp chunks of whole blocks).
    Returns `(info, kwargs)`; one process: `(None, {})`."""
    from longctx.eval.niah import context_parallel_answer_logits
    from longctx.parallel.context import parallelize_model
    from longctx.train.distributed import all_reduce_sum, init_distributed, launched_distributed

    if not launched_distributed():
        # The run's config keeps its training parallel.cp; one process simply evaluates whole sequences.
        return None, {}
    info = init_distributed(cfg)
    model.to(info.device)
    kwargs = {"shard": (info.dp_rank, info.dp_size), "reduce": lambda v: all_reduce_sum(v, info)}
    if info.cp_size > 1:
        multiple = 2 * info.cp_size * cfg.model.block_multiple()
        bad = [n for n in lengths if n % multiple and whole_blocks]
        if bad:
            raise ValueError(
                f"lengths {bad} do not split into {2 * info.cp_size} zigzag chunks of whole "
                f"{cfg.model.block_multiple()}-token blocks (parallel.cp={info.cp_size}); use multiples of "
                f"{multiple}"
            )
        parallelize_model(model, info.cp_group, cfg.parallel.cp_comm)
        kwargs["forward"] = context_parallel_answer_logits(model, info.cp_rank, info.cp_size, info.cp_group)
        # Only one rank of each CP group counts its (identical) hits.
        count = kwargs["reduce"]
        kwargs["reduce"] = lambda v: count([x if info.cp_rank == 0 else 0.0 for x in v])
    return info, kwargs


def cmd_niah(args) -> int:
    from longctx.eval.niah import evaluate_niah, niah_table, write_niah

    model, cfg, tok = load_model_for_eval(args.run, args.checkpoint, args.overrides)
    lengths = args.lengths or cfg.eval.lengths
    info, dist_kwargs = _distributed_eval(model, cfg, lengths)
    is_main = info is None or info.is_main
    progress = not args.no_progress and is_main
    # The haystack is training text, the same kind training's passkey samples were cut from (the
    # key is random, so having read the text does not help).
    if args.haystack:
        docs = text_documents(args.haystack, tok)
    else:
        writer = info is None or info.local_rank == 0
        wait = info.barrier if info is not None else None
        from longctx.data import prepare_dataset

        docs = prepare_dataset(cfg, tok, is_writer=writer, wait_fn=wait, progress=progress).train
    results = evaluate_niah(
        model,
        tok,
        docs,
        lengths=lengths,
        depths=args.depths if args.depths is not None else cfg.eval.depths,
        samples=args.samples or cfg.eval.samples,
        seed=args.seed,
        n_digits=args.digits or cfg.data.passkey_digits,
        batch_size=args.batch_size or cfg.eval.batch_size,
        progress=progress,
        **dist_kwargs,
    )
    if info is not None:
        results["processes"] = {"dp": info.dp_size, "cp": info.cp_size}
    if is_main:
        json_path, png_path = write_niah(results, args.out or Path(args.run) / "niah")
        print(niah_table(results))
        print(f"wrote {json_path} and {png_path}")
    if info is not None:
        from longctx.train.distributed import shutdown

        shutdown()
    return 0


def cmd_ruler(args) -> int:
    from longctx.eval.ruler import evaluate_ruler, parse_tasks, ruler_table, write_ruler

    tasks = parse_tasks(args.tasks)
    model, cfg, tok = load_model_for_eval(args.run, args.checkpoint, args.overrides)
    lengths = args.lengths or cfg.eval.lengths
    # A prompt's longest prefix of whole blocks is prefilled context-parallel, the rest stepped through.
    info, dist_kwargs = _distributed_eval(model, cfg, lengths, whole_blocks=False)
    if dist_kwargs.pop("forward", None) is not None:
        # Context-parallel: the group prefills each prompt together, then every rank decodes it.
        from longctx.generation import generate
        from longctx.model.decoding import context_parallel_prefill

        prefill = context_parallel_prefill(
            info.cp_rank, info.cp_size, info.cp_group, cfg.model.block_multiple()
        )
        dist_kwargs["generate"] = lambda tokens, n: generate(model, tokens, n, prefill_fn=prefill).new_tokens
    is_main = info is None or info.is_main
    progress = not args.no_progress and is_main
    if args.haystack:
        docs = text_documents(args.haystack, tok)
    else:
        from longctx.data import prepare_dataset

        writer = info is None or info.local_rank == 0
        wait = info.barrier if info is not None else None
        docs = prepare_dataset(cfg, tok, is_writer=writer, wait_fn=wait, progress=progress).train
    results = evaluate_ruler(
        model,
        tok,
        docs,
        tasks=tasks,
        lengths=lengths,
        depths=args.depths if args.depths is not None else cfg.eval.depths,
        samples=args.samples or cfg.eval.samples,
        seed=args.seed,
        batch_size=args.batch_size or cfg.eval.batch_size,
        progress=progress,
        **dist_kwargs,
    )
    if info is not None:
        results["processes"] = {"dp": info.dp_size, "cp": info.cp_size}
    if is_main:
        json_path, _ = write_ruler(results, args.out or Path(args.run) / "ruler")
        print(ruler_table(results))
        print(f"wrote {json_path}, heatmap_<task>.png and summary.png in {json_path.parent}")
    if info is not None:
        from longctx.train.distributed import shutdown

        shutdown()
    return 0


def cmd_lm_eval(args) -> int:
    from longctx.eval.lm_eval_adapter import make_tasks, run_lm_eval

    if args.make_tasks:
        names = make_tasks(args.make_tasks)
        print(
            f"wrote {', '.join(names)} to {args.make_tasks}; run them with --include_path {args.make_tasks}"
        )
        return 0
    rest = args.lm_eval_args[1:] if args.lm_eval_args[:1] == ["--"] else args.lm_eval_args
    if not rest:
        raise ValueError(
            "give lm_eval's arguments after --, e.g. -- --model longctx --model_args run=RUN --tasks T"
        )
    return run_lm_eval(rest)


def cmd_ppl(args) -> int:
    from longctx.eval.ppl import ppl_compare_table, ppl_table, write_ppl, write_ppl_compare

    if (args.run is None) == (args.compare is None):
        raise ValueError("eval ppl needs either --run RUN or --compare RUN_A RUN_B")
    if args.lengths and args.seq_len:
        raise ValueError("give --seq-len or --lengths, not both")
    if args.compare:
        if args.checkpoint:
            raise ValueError("--checkpoint names one run's weights; --compare uses each run's own")
        compare = {run: _ppl_at_lengths(run, args) for run in args.compare}
        names = {run: Path(run).name or run for run in args.compare}
        if len(set(names.values())) < len(names):
            names = {run: run for run in args.compare}
        compare = {names[run]: results for run, results in compare.items()}
        json_path, png_path = write_ppl_compare(compare, args.out or Path(args.compare[1]) / "ppl-compare")
        print(ppl_compare_table(compare))
        print(f"wrote {json_path} and {png_path}")
        return 0
    results = _ppl_at_lengths(args.run, args)
    out = Path(args.out or Path(args.run) / "ppl")
    for res in results:
        # One length keeps the plain RUN/ppl/ppl.json; several go to RUN/ppl/<length>/.
        json_path, png_path = write_ppl(res, out if len(results) == 1 else out / str(res["seq_len"]))
        print(ppl_table(res))
        print(f"wrote {json_path} and {png_path}")
    return 0


def _ppl_at_lengths(run: str, args) -> list[dict]:
    """`evaluate_ppl` of run `run` at each of `--lengths` (or `--seq-len`, or its data.seq_len), on
    its held-out text."""
    from longctx.eval.ppl import evaluate_ppl

    model, cfg, tok = load_model_for_eval(run, args.checkpoint, args.overrides)
    progress = not args.no_progress
    data = _prepared(cfg, tok, progress)
    # A tiny corpus may have no validation split; its training text then stands in, said aloud.
    docs = data.val
    if docs.num_tokens == 0:
        print(f"{run}: the corpus has no validation split; measuring on training text")
        docs = data.train
    lengths = args.lengths or [args.seq_len or cfg.data.seq_len]
    return [
        evaluate_ppl(
            model,
            docs,
            seq_len=length,
            batch_size=args.batch_size or cfg.eval.batch_size,
            batches=args.batches,
            n_buckets=args.buckets,
            seed=cfg.train.seed,
            progress=progress,
        )
        for length in lengths
    ]
