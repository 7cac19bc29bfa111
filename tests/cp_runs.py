"""Train several configurations in one torchrun launch (imports and process group set up once).

    torchrun --nproc-per-node 2 -m tests.cp_runs SPEC.json

SPEC is a JSON list of `{"run_dir": ..., "overrides": [...], "config": ...}` (config defaults to
configs/tiny.yaml). A launch
costs each process seconds of imports (megatron.core alone is about 5 s of CPU); the distributed
tests batch their runs through here to keep the suite fast. Between runs only megatron's model-
parallel state is reset, so each run may use its own `parallel.cp`.
"""

import json
import sys

from megatron.core import parallel_state

from longctx.hf import load_config
from longctx.train.metrics import plot_loss
from longctx.train.trainer import Trainer


def main(spec_path: str) -> None:
    for run in json.loads(open(spec_path).read()):
        config = run.get("config", "configs/tiny.yaml")
        cfg = load_config(config, [*run["overrides"], f"train.run_dir={run['run_dir']}"])
        trainer = Trainer(cfg)
        trainer.train()
        trainer.metrics.close()
        if trainer.dist.is_main:
            plot_loss(trainer.run_dir)
        parallel_state.destroy_model_parallel()
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
