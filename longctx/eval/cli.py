"""`longctx eval niah` and `longctx eval ppl`: evaluate a trained run directory.

    longctx eval niah --run runs/demo-pretrain --lengths 256,512 --depths 0,0.25,0.5,0.75,1 --samples 20
    longctx eval niah --run RUN --lengths 512 model.rope.scaling.type=linear model.rope.scaling.factor=2
    longctx eval ppl --run runs/demo-pretrain --seq-len 512 --batches 8
    longctx eval ppl --compare runs/demo-pretrain runs/demo-continue --lengths 256,512
    longctx eval ruler --run runs/demo-continue --lengths 256,512 --tasks niah_multikey,vt --samples 8

The model is rebuilt from `RUN/config.yaml` (plus any `key=value` overrides, e.g. a RoPE scaling to
try) with the run's tokenizer (`RUN/tokenizer.model` or `tokenizer.json`), and its weights come from
`--checkpoint` (default: the run's own, see `longctx.weights.find_weights`). Results go to `--out` (default
`RUN/niah`, `RUN/ppl`, `RUN/ruler`) and the console. Options left out take their value from the run's `eval`
section (`eval.lengths`, `eval.depths`, `eval.samples`, `eval.batch_size`) and `data.passkey_digits`.
"""

import argparse
from pathlib import Path

import numpy as np

from longctx.config import Config
from longctx.weights import WEIGHTS_FILE, load_model_for_eval


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

    return prepare_dataset(cfg.data, tokenizer, progress=progress)


def _haystack_corpus(cfg: Config, tokenizer, info, progress: bool):
    """The run's prepared training text (one process per node prepares it under torchrun)."""
    from longctx.data import open_dataset, prepare_dataset

    prepare = lambda: prepare_dataset(cfg.data, tokenizer, progress=progress)  # noqa: E731
    if info is None:
        return prepare().train
    return info.writer_first(prepare, lambda: open_dataset(cfg.data, tokenizer)).train


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
    from longctx.eval.niah import NiahOptions, evaluate_niah, niah_table, write_niah

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
        docs = _haystack_corpus(cfg, tok, info, progress)
    options = NiahOptions(
        lengths=lengths,
        depths=args.depths if args.depths is not None else cfg.eval.depths,
        samples=args.samples or cfg.eval.samples,
        seed=args.seed,
        n_digits=args.digits or cfg.data.passkey_digits,
        batch_size=args.batch_size or cfg.eval.batch_size,
        progress=progress,
    )
    results = evaluate_niah(model, tok, docs, options, **dist_kwargs)
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
        docs = _haystack_corpus(cfg, tok, info, progress)
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
        passkey_digits=cfg.data.passkey_digits,
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
