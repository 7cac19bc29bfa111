"""Process groups for data x context parallelism, from `megatron.core.parallel_state`.

Launched by torchrun (or the deepspeed launcher, or Slurm through launch/), every process reads
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from the environment. `parallel.cp`
ranks share each sequence (context parallel); the rest is data parallel. Gradients are averaged
over the data-parallel group *with* context parallelism (DP x CP), because every CP rank holds the
gradient of its own tokens' loss. Without the torchrun variables, training runs in one process.
"""

import datetime
import hashlib
import json
import os
import socket
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longctx.config import Config, ParallelConfig, config_to_dict

# megatron-core says at import, once per module, that it falls back to PyTorch implementations when
# NVIDIA's Transformer Engine and Apex are absent; longctx uses only its process groups.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


class DistributedSetupError(RuntimeError):
    """The processes of a run could not find each other; the message says where they looked."""


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1
    cp_group: object = None
    # Data parallel with context parallel: the gradient-averaging group.
    grad_group: object = None
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def writer_first(self, write, read=None):
        """`write()` on one process per node (local rank 0) while the others wait, then `read()`
        (default `write`) on the others: for caches every process reads (tokenizer, prepared data)."""
        result = write() if self.local_rank == 0 else None
        self.barrier()
        return result if self.local_rank == 0 else (read or write)()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a one-machine rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(nproc: int, module: str = "longctx", args=(), torchrun_args=()) -> list[str]:
    """`python -m torch.distributed.run --nproc-per-node NPROC [torchrun_args] -m MODULE ARGS` on this
    machine; without `torchrun_args`, `--master-port` is a free port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        *(torchrun_args or ["--master-port", str(free_port())]),
        "-m",
        module,
        *args,
    ]


def launched_distributed() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def choose_backend(cfg: ParallelConfig) -> str:
    cuda = torch.cuda.is_available()
    if cfg.backend == "auto":
        return "nccl" if cuda else "gloo"
    if cfg.backend == "nccl" and not cuda:
        raise ValueError(
            "parallel.backend=nccl needs CUDA GPUs, and torch sees none here; use parallel.backend=gloo "
            "(or auto) to run on CPU"
        )
    return cfg.backend


def _attempt_store(world: int, timeout: datetime.timedelta):
    """Under torchrun, the agent's store with a prefix per restart attempt, else None (the default).

    torchrun keeps one store for all attempts of `--max-restarts`; without a prefix, the workers of a
    restarted attempt read the keys of the killed one (rank 0's old gloo address) and fail to connect.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    base = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"longctx/attempt_{attempt}", base)


def init_distributed(cfg: Config) -> DistInfo:
    """Initialise torch.distributed and megatron's parallel_state; one-process runs skip both."""
    pcfg = cfg.parallel
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not launched_distributed():
        if pcfg.cp > 1:
            raise ValueError(
                f"parallel.cp={pcfg.cp} needs {pcfg.cp} processes; launch with "
                f"`torchrun --nproc-per-node {pcfg.cp} -m longctx train ...` (or launch/torchrun.sh)"
            )
        choose_backend(pcfg)
        if pcfg.engine != "deepspeed":
            return DistInfo(device=device)
        # DeepSpeed always runs inside a process group: make a one-process one.
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )

    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world % pcfg.cp:
        raise ValueError(
            f"parallel.cp={pcfg.cp} does not divide the world size {world}; the data-parallel size would not "
            f"be whole. Use a cp among {[d for d in range(1, world + 1) if world % d == 0]} or launch a "
            f"multiple of {pcfg.cp} processes"
        )
    backend = choose_backend(pcfg)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        timeout = datetime.timedelta(seconds=pcfg.timeout_s)
        try:
            dist.init_process_group(
                backend, rank=rank, world_size=world, timeout=timeout, store=_attempt_store(world, timeout)
            )
        except (RuntimeError, TimeoutError, ValueError) as e:
            raise DistributedSetupError(
                f"rank {rank} of {world} could not join the process group at {where} within "
                f"{pcfg.timeout_s}s ({type(e).__name__}: {str(e).splitlines()[0][:200]}). Check that every "
                "node uses the same MASTER_ADDR/MASTER_PORT (or --rdzv-endpoint), that the port is open, "
                "and that all nodes were started"
            ) from e

    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            context_parallel_size=pcfg.cp, distributed_timeout_minutes=max(1, pcfg.timeout_s // 60)
        )
    return DistInfo(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        cp_rank=ps.get_context_parallel_rank(),
        cp_size=ps.get_context_parallel_world_size(),
        cp_group=ps.get_context_parallel_group(),
        grad_group=ps.get_data_parallel_group(with_context_parallel=True),
        device=device,
    )


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_same_config(cfg: Config, info: DistInfo) -> None:
    """Fail on every rank, naming the first differing key, if the ranks resolved different configs."""
    if not info.enabled:
        return
    mine = json.dumps(config_to_dict(cfg), sort_keys=True, default=str)
    digests = [None] * info.world_size
    dist.all_gather_object(digests, hashlib.sha256(mine.encode()).hexdigest())
    if len(set(digests)) == 1:
        return
    configs = [None] * info.world_size
    dist.all_gather_object(configs, _flatten(config_to_dict(cfg)))
    odd = next(r for r, d in enumerate(digests) if d != digests[0])
    key = next(k for k in configs[0] if configs[0][k] != configs[odd].get(k))
    raise ValueError(
        f"ranks disagree on the config: {key} is {configs[0][key]!r} on rank 0 but {configs[odd].get(key)!r} "
        f"on rank {odd}; launch every rank with the same config file and overrides"
    )


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum floats over the gradient (DP x CP) group; identity in one process."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, group=info.grad_group)
    return t.tolist()


class MegatronMPU:
    """What `deepspeed.initialize(mpu=...)` asks for, over megatron's parallel_state.

    DeepSpeed wants `get_model_parallel_*` (tensor parallel here: size 1) and `get_data_parallel_*`;
    the data-parallel group is the one *with* context parallelism, so gradients average over DP x CP.
    """

    def __init__(self):
        from megatron.core import parallel_state

        self.ps = parallel_state

    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank(with_context_parallel=True)

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size(with_context_parallel=True)

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group(with_context_parallel=True)


def shutdown() -> None:
    if dist.is_initialized():
        try:
            from megatron.core import parallel_state as ps

            ps.destroy_model_parallel()
        finally:
            dist.destroy_process_group()
