"""Peak host memory (ru_maxrss) of every rank while loading a Hugging Face model and training a few steps.

    python -m bench.host_memory make --out /tmp/llama300m --tokenizer runs/x/tokenizer.model
    torchrun --nproc-per-node 2 -m bench.host_memory run --config configs/tiny.yaml \
        train.init_from=hf:/tmp/llama300m parallel.fsdp=true train.steps=3 train.run_dir=/tmp/hm2

`make` saves a random ~300M-parameter Llama with `transformers` (fp32 safetensors, 1.2 GB) next to the
given SentencePiece tokenizer; `run` trains the config and prints, per rank, the process's peak
resident memory just before the engine is built (`before_engine_mib`: for DeepSpeed ZeRO-3 the model
is partitioned and loaded by then, and `deepspeed.initialize` adds its fp32 master and gradient
partitions), after building and loading (before the first step) and after training (`--load-only`:
stop after loading).
"""

import argparse
import json
import resource
import shutil
import sys
from pathlib import Path


def make(out: str, tokenizer: str, vocab: int) -> None:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=1536,
        intermediate_size=4096,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(out)
    shutil.copy(tokenizer, Path(out) / "tokenizer.model")
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")


def peak_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(config: str, overrides: list[str], load_only: bool = False) -> None:
    import torch.distributed as dist

    import longctx.train.trainer as trainer_module
    from longctx.hf import load_config
    from longctx.train.trainer import Trainer

    build_engine, before = trainer_module.build_engine, {}

    def measured_build_engine(*args, **kwargs):
        before["mib"] = peak_mib()
        return build_engine(*args, **kwargs)

    trainer_module.build_engine = measured_build_engine
    try:
        trainer = Trainer(load_config(config, overrides))
    finally:
        trainer_module.build_engine = build_engine
    loaded = peak_mib()
    mine = {"rank": trainer.dist.rank, "before_engine_mib": round(before["mib"])}
    mine["after_load_mib"] = round(loaded)
    if not load_only:
        trainer.train()
        mine["after_train_mib"] = round(peak_mib())
    rows = [mine]
    if dist.is_initialized():
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, mine)
    if trainer.dist.is_main:
        print(json.dumps({"world_size": trainer.dist.world_size, "ranks": rows}))
    trainer.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.host_memory")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", required=True, help="a SentencePiece .model")
    p.add_argument("--vocab", type=int, default=1024)
    p = sub.add_parser("run")
    p.add_argument("--config")
    p.add_argument("--load-only", action="store_true", help="stop after building and loading")
    p.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.command == "make":
        make(args.out, args.tokenizer, args.vocab)
    else:
        run(args.config, args.overrides, args.load_only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
