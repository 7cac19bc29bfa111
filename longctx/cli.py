"""The `longctx` command line (also `python -m longctx`, so `torchrun -m longctx train ...` works).

longctx train --config configs/tiny.yaml train.steps=30 train.run_dir=runs/x
longctx tokenizer train --config configs/tiny.yaml --out runs/tok.model
longctx data prepare --config configs/tiny.yaml data.source=corpus/ data.cache_dir=.cache/longctx
longctx eval niah --run runs/x --lengths 512,1024 --depths 0,0.5,1 --samples 20
longctx eval ppl --run runs/x --seq-len 1024
longctx generate --run runs/x --prompt "The pass key is" --max-new-tokens 16
longctx export --run runs/x --out exported/x
longctx check
longctx plan --config configs/llama3-8b-128k.yaml --gpus 8 --gpu-memory 80GiB
"""

import argparse
import sys

from longctx.config import ConfigError
from longctx.eval.cli import add_eval_parsers
from longctx.generation import add_generate_parser
from longctx.hf import load_config
from longctx.plan import add_plan_args
from longctx.train.distributed import DistributedSetupError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (configs/*.yaml); defaults if omitted")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    # Launchers that still pass it (deepspeed); the rank comes from the LOCAL_RANK variable.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)


def cmd_train(args) -> int:
    from longctx.train.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    return 0


def cmd_tokenizer_train(args) -> int:
    from longctx.data import iter_documents
    from longctx.tokenizer import Tokenizer, train_tokenizer

    cfg = load_config(args.config, args.overrides)
    docs = iter_documents(cfg.data.source, cfg.data.text_field, cfg.data.cache_dir)
    path = train_tokenizer(docs, cfg.model.vocab_size, args.out)
    tok = Tokenizer(path)
    print(f"wrote {path} ({tok.vocab_size} tokens); use it with data.tokenizer={path}")
    return 0


def cmd_data_prepare(args) -> int:
    import time

    from longctx.data import load_tokenizer, prepare_dataset

    cfg = load_config(args.config, args.overrides)
    start = time.perf_counter()
    tok = load_tokenizer(cfg.data, cfg.model.vocab_size)
    data = prepare_dataset(cfg.data, tok, progress=True)
    seconds = time.perf_counter() - start
    for name, docs in (("train", data.train), ("val", data.val)):
        print(f"{name}: {docs.num_docs:,} documents, {docs.num_tokens:,} tokens  ({docs.prefix}.bin/.idx)")
    if data.built:
        tokens = data.train.num_tokens + data.val.num_tokens
        built = data.meta["seconds"]
        print(
            f"prepared {data.path} in {built:.1f}s ({tokens / max(built, 1e-9) * 60:,.0f} tokens/minute; "
            f"{seconds:.1f}s in all, tokenizer {tok.path})"
        )
    else:
        print(f"already prepared: {data.path} (tokenizer {tok.path}); nothing to do")
    return 0


BENCHES = ("kernels", "train", "comm", "report", "memory", "scale")


def cmd_bench(args) -> int:
    import importlib

    module = importlib.import_module(f"longctx.bench.{args.which}")
    return module.main(args.bench_args)


def cmd_check(args) -> int:
    from longctx.kernels.check import main as check_main

    return check_main(args.check_args)


def cmd_plan(args) -> int:
    from longctx.plan import run_plan

    print(run_plan(args.config, args.overrides, args.gpus, args.gpu_memory, args.seq_len))
    return 0


def cmd_export(args) -> int:
    from longctx.export import export_checkpoint
    from longctx.weights import find_checkpoint

    checkpoint = find_checkpoint(args.run, args.checkpoint)
    fmt = "hf" if args.hf else "native"
    out = export_checkpoint(checkpoint, args.out, fmt, force=args.force)
    print(f"exported {checkpoint} to {out} ({fmt} format)")
    note = out / "LONGCTX.md"
    if fmt == "hf" and note.is_file():
        print(f"note: transformers cannot load this model as trained; see {note}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longctx", description="Long-context LM training runtime")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train or continue-train a model")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="action", required=True)
    p = tok.add_parser("train", help="train a SentencePiece tokenizer on data.source")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="where to write the .model file")
    p.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="action", required=True)
    p = data.add_parser("prepare", help="tokenize data.source into a cached Megatron indexed dataset")
    _add_config_args(p)
    p.set_defaults(func=cmd_data_prepare)

    add_eval_parsers(sub)
    add_generate_parser(sub)
    p = sub.add_parser(
        "bench",
        help="benchmarks: kernels | train (GPU); comm | memory | scale | report (any machine)",
        description="Run a benchmark; options after the name go to it (e.g. `longctx bench comm --help`).",
    )
    p.add_argument("which", choices=BENCHES)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench, raw=True)

    p = sub.add_parser(
        "check",
        help="every Triton kernel against the PyTorch reference on this GPU (interpreter without one)",
        description="Options go to python -m longctx.kernels.check (e.g. `longctx check --ops flash s2`).",
    )
    p.add_argument("check_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("export", help="write a checkpoint's full weights (safetensors) and model config")
    p.add_argument("--run", help="run directory (its latest checkpoint unless --checkpoint is given)")
    p.add_argument("--checkpoint", help="a checkpoint directory, or its name inside RUN/checkpoints/")
    p.add_argument("--out", required=True, help="a new (or empty) directory to write the export to")
    p.add_argument("--force", action="store_true", help="replace --out and everything in it")
    p.add_argument(
        "--hf",
        action="store_true",
        help="write a Hugging Face Llama/Mistral/Qwen2 folder (tensor names, config.json, the run's "
        "tokenizer) that transformers loads; a converted S/N/L stack adds LONGCTX.md on what it "
        "cannot express",
    )
    p.set_defaults(func=cmd_export, overrides=[])

    p = sub.add_parser(
        "plan", help="per-GPU memory of a config by component, the longest sequence that fits, suggestions"
    )
    _add_config_args(p)
    add_plan_args(p)
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:  # its options go through unchanged, in order
        return cmd_check(argparse.Namespace(check_args=argv[1:]))
    parser = build_parser()
    # Overrides may come before or after options (launchers append their own arguments).
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "raw", False):
        args.bench_args = [*args.bench_args, *extra]
        extra = []
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "config")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except (ConfigError, ValueError, OSError, DistributedSetupError) as e:
        print(f"longctx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("longctx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
