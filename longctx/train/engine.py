"""Training engines: the same model, data and losses under torch (DDP or FSDP2) or DeepSpeed ZeRO.

    engine = build_engine(model, cfg, info)
    loss = loss_fn(engine(tokens, layout)); engine.backward(loss); grad_norm = engine.step()

`parallel.engine=torch`: one process trains the model as it is; with several, DDP averages gradients
over the data x context group, or FSDP2 (`parallel.fsdp=true`) shards parameters, gradients and
optimizer state over it. `parallel.engine=deepspeed`: `deepspeed.initialize` with ZeRO stage
`parallel.zero_stage`, megatron's parallel_state as `mpu`, and our AdamW and LR schedule, so both
engines take identical steps.

Both engines save and load the full training state for `longctx.train.checkpoint`:
`engine.save_checkpoint(dir)` / `engine.load_checkpoint(dir, meta)`. The torch engine writes one
`torch.distributed.checkpoint` of model and optimizer (keyed by parameter name, so it loads at any
DP/CP degree, sharded or not); DeepSpeed writes its own format, converted to its universal format when
the degree changes (`build_engine(..., load_universal=True)`).
"""

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from longctx.config import Config
from longctx.train.checkpoint_io import dcp_errors, dcp_load, quiet_single_process, weights_only_torch_load
from longctx.train.distributed import DistInfo, MegatronMPU
from longctx.train.optim import build_optimizer, build_scheduler


class TorchEngine:
    def __init__(self, model: nn.Module, cfg: Config, info: DistInfo, grad_accum: int = 1):
        self.module = model
        self.cfg = cfg
        self.grad_accum = grad_accum
        if cfg.parallel.fsdp:
            self.wrapped = _fully_shard(model, info, cfg.parallel.dp_replicate)
        elif info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [info.device.index] if info.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(model, device_ids=ids, process_group=info.grad_group)
        else:
            self.wrapped = model
        if any(p.is_meta for p in model.parameters()):
            # Built on meta and sharded: each rank materialises and initialises its own shards.
            model.to_empty(device=info.device)
            model.init_weights(cfg.train.seed)
        self.optimizer = build_optimizer(model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)

    def __call__(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)

    def accumulating(self, last: bool):
        """Context for one micro-batch's forward and backward: gradients are reduced across ranks
        only on the `last` micro-batch of a step (DDP no_sync, FSDP2 set_requires_gradient_sync)."""
        if hasattr(self.wrapped, "set_requires_gradient_sync"):
            self.wrapped.set_requires_gradient_sync(last)
        elif hasattr(self.wrapped, "no_sync") and not last:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate one micro-batch's mean loss; the step's gradient is their mean."""
        (loss / self.grad_accum if self.grad_accum > 1 else loss).backward()

    def step(self) -> float:
        clip = self.cfg.train.grad_clip
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _state_dicts(self) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        # Flattened: optimizer entries keyed by parameter name ("state.layers.0.mlp.w1.weight.exp_avg"),
        # so DCP can reshard them like the parameters.
        options = StateDictOptions(flatten_optimizer_state_dict=True)
        return get_state_dict(self.module, self.optimizer, options=options)

    def save_checkpoint(self, path: Path, process_group=None, async_save: bool = False):
        """Write model and optimizer tensors to `path/state` (DCP, each rank its shards); with
        `async_save`, return the future of the write, which runs on a background thread."""
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = self._state_dicts()
        # Only tensors go to DCP (its other values would be pickled); hyperparameters come from the config.
        state = {
            "model": model_sd,
            "optim": {k: v for k, v in optim_sd.items() if isinstance(v, torch.Tensor)},
        }
        writer = dcp.FileSystemWriter(str(Path(path) / "state"))
        one_process = not torch.distributed.is_initialized()
        with dcp_errors(path), quiet_single_process():
            if async_save:
                result = dcp.async_save(
                    state, storage_writer=writer, process_group=process_group, no_dist=one_process
                )
                return getattr(result, "upload_completion", result)
            dcp.save(state, storage_writer=writer, no_dist=one_process)
        return None

    def load_checkpoint(self, path: Path, meta: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        model_sd, optim_sd = self._state_dicts()
        state = {
            "model": model_sd,
            "optim": {k: v for k, v in optim_sd.items() if isinstance(v, torch.Tensor)},
        }
        dcp_load(state, Path(path) / "state")
        optim_sd.update(state["optim"])
        set_state_dict(
            self.module,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=optim_sd,
            options=StateDictOptions(flatten_optimizer_state_dict=True),
        )


def shard_mesh(info: DistInfo, dp_replicate: int = 1):
    """The DP x CP ranks as FSDP2's mesh: 1D (shard over all), or with `dp_replicate` > 1 a 2D
    (replicate, shard) mesh whose shard groups are runs of consecutive ranks (a node's GPUs)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    if dp_replicate == 1:
        return DeviceMesh.from_group(info.grad_group, info.device.type)
    ranks = dist.get_process_group_ranks(info.grad_group)
    if len(ranks) % dp_replicate:
        raise ValueError(
            f"parallel.dp_replicate={dp_replicate} does not divide the {len(ranks)} data x context ranks; "
            f"use one of {[d for d in range(1, len(ranks) + 1) if len(ranks) % d == 0]}"
        )
    grid = torch.tensor(ranks).view(dp_replicate, -1)
    return DeviceMesh(info.device.type, grid, mesh_dim_names=("replicate", "shard"))


def _fully_shard(model: nn.Module, info: DistInfo, dp_replicate: int = 1) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not info.enabled:
        raise ValueError("parallel.fsdp=true shards over several processes; launch with torchrun")
    mesh = shard_mesh(info, dp_replicate)
    policy = MixedPrecisionPolicy()
    if info.device.type == "cuda":
        # bf16 compute and all-gathers, fp32 gradient reduction and master weights.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def deepspeed_config(cfg: Config, info: DistInfo, grad_accum: int = 1) -> dict:
    """The DeepSpeed JSON: the user's file if given, else generated from our config."""
    path = cfg.parallel.deepspeed_config
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"parallel.deepspeed_config {path!r} not found")
        try:
            ds = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"parallel.deepspeed_config {path!r} is not valid JSON: {e}") from e
        if "optimizer" in ds or "scheduler" in ds:
            raise ValueError(
                f"{path}: remove the 'optimizer'/'scheduler' sections; longctx passes its own AdamW and LR "
                "schedule (train.lr, train.warmup, ...) so both engines train alike"
            )
        ds.setdefault("train_micro_batch_size_per_gpu", cfg.train.batch_size)
        if ds.setdefault("gradient_accumulation_steps", grad_accum) != grad_accum:
            raise ValueError(
                f"{path}: gradient_accumulation_steps={ds['gradient_accumulation_steps']} contradicts "
                f"train.grad_accum={grad_accum}; remove it from the file (longctx sets it) or make them equal"
            )
        return ds
    zero = {"stage": cfg.parallel.zero_stage}
    if cfg.parallel.dp_replicate > 1:
        # ZeRO++ hierarchical partitioning: a secondary copy of the parameters sharded within groups.
        degree = info.dp_size * info.cp_size
        if degree % cfg.parallel.dp_replicate:
            raise ValueError(
                f"parallel.dp_replicate={cfg.parallel.dp_replicate} does not divide the {degree} data x "
                "context ranks"
            )
        zero["zero_hpz_partition_size"] = degree // cfg.parallel.dp_replicate
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": info.device.type == "cuda"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class _DeepSpeedMPU(MegatronMPU):
    """DeepSpeed's universal-checkpoint loader also asks for the tensor-parallel names (size 1 here)."""

    def get_tensor_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()


class DeepSpeedEngine:
    def __init__(
        self, model: nn.Module, cfg: Config, info: DistInfo, load_universal: bool = False, grad_accum: int = 1
    ):
        try:
            import deepspeed
        except ImportError as e:
            raise ImportError("parallel.engine=deepspeed needs DeepSpeed: pip install deepspeed") from e
        self.module = model
        optimizer = build_optimizer(model, cfg.train)
        scheduler = build_scheduler(optimizer, cfg.train)
        ds_config = deepspeed_config(cfg, info, grad_accum)
        self.load_universal = load_universal
        if load_universal:
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_config,
            mpu=_DeepSpeedMPU(),
        )

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def accumulating(self, last: bool):
        # DeepSpeed counts micro-batches itself (gradient_accumulation_steps) and syncs on the last.
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """DeepSpeed divides the loss by gradient_accumulation_steps; `engine.step()` of a micro-batch
        before the boundary only advances its micro-step count."""
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def save_checkpoint(self, path: Path, process_group=None, async_save: bool = False):
        """`engine.save_checkpoint` into `path/deepspeed` (every rank its ZeRO partition)."""
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        # The info DeepSpeed's universal conversion (ds_to_universal) looks for.
        client_state = {
            UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
        }
        self.engine.save_checkpoint(str(path), tag="deepspeed", client_state=client_state, save_latest=False)
        return None

    def load_checkpoint(self, path: Path, meta: dict) -> None:
        tag = "deepspeed_universal" if self.load_universal else "deepspeed"
        if not (Path(path) / tag).is_dir():
            raise FileNotFoundError(f"checkpoint directory {str(Path(path) / tag)!r} is missing")
        # The LR schedule comes back from meta.json, like the torch engine's.
        with weights_only_torch_load():
            loaded, _ = self.engine.load_checkpoint(
                str(path), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        if loaded is None:
            raise ValueError(f"DeepSpeed found no checkpoint in {str(Path(path) / tag)!r}")


def build_engine(
    model: nn.Module, cfg: Config, info: DistInfo, load_universal: bool = False, grad_accum: int = 1
):
    """The engine of `parallel.engine`; `grad_accum` micro-batches make one optimizer step."""
    if cfg.parallel.engine == "deepspeed":
        return DeepSpeedEngine(model, cfg, info, load_universal, grad_accum)
    return TorchEngine(model, cfg, info, grad_accum)
