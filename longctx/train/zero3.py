"""DeepSpeed ZeRO-3 without the whole model on any rank: a meta-built model partitioned one tensor at a time.

    model = build_model(cfg.model, "meta")
    partition_zero3(model, cfg, info, grad_accum)    # every rank now keeps 1/W of each parameter
    engine = build_engine(model, cfg, info, ...)      # deepspeed.initialize takes the partitioned model

`partition_zero3` makes each parameter on its own: the full-size tensor, initialised by the model's
rule for it from its own generator seeded by the run's seed and the parameter's name
(`Transformer.init_rules`, `init_param`: the values the one-process and FSDP2 models start with), is
handed to `deepspeed.zero.Init` (the engine's DeepSpeed config, data x context group and dtype), which
keeps this rank's partition and frees the rest before the next parameter is made. The peak above the
partitions is one full tensor, never the model.

A ZeRO-3 partition is flat: the parameter flattened and padded to a multiple of the W ranks of its
group, rank r keeping elements `[r * n, (r + 1) * n)`, `n = ceil(numel / W)` (`flat_range`), in
`param.ds_tensor`. `longctx.train.sharded_load` reads exactly that element range of each tensor from
safetensors files into it, before `deepspeed.initialize` copies the partitions into its fp32 master.
"""

import torch
from torch import nn

from longctx.config import Config
from longctx.train.distributed import DistInfo


def uses_zero_init(cfg: Config, world_size: int) -> bool:
    """Whether the run builds on meta and partitions for ZeRO-3 before the engine: DeepSpeed ZeRO-3 on
    several processes (one process keeps the whole model anyway), untied embeddings (a shared matrix
    is one parameter under two names, which the per-name init would set twice)."""
    return (
        cfg.parallel.engine == "deepspeed"
        and cfg.parallel.zero_stage == 3
        and world_size > 1
        and not cfg.model.tie_embeddings
    )


def is_zero3(param) -> bool:
    """A parameter partitioned by DeepSpeed ZeRO-3 (its data is empty; `ds_tensor` holds this rank's part)."""
    return hasattr(param, "ds_tensor") and param.ds_tensor is not None


def flat_range(param) -> tuple[int, int]:
    """The elements `[start, stop)` of the flattened full parameter that this rank's `ds_tensor` holds
    (`stop - start` is less than the partition on the last ranks, whose tail is padding)."""
    import torch.distributed as dist

    size = param.ds_tensor.ds_numel
    start = min(size * dist.get_rank(group=param.ds_process_group), param.ds_numel)
    return start, min(start + size, param.ds_numel)


def _zero_init(cfg: Config, info: DistInfo, grad_accum: int):
    """A `deepspeed.zero.Init` with the engine's config, data x context group and hpZeRO group; it is
    never entered (no constructor patching), only used to convert parameters one at a time."""
    import deepspeed
    from deepspeed.utils import groups

    from longctx.train.engine import _DeepSpeedMPU, deepspeed_config

    ds_config = deepspeed_config(cfg, info, grad_accum)
    hpz = ds_config.get("zero_optimization", {}).get("zero_hpz_partition_size", 1)
    # The engine makes the hpZeRO group only if none exists; make it here, once, so both use one.
    if hpz > 1 and groups._get_zero_param_intra_parallel_group() is None:
        groups._create_zero_param_parallel_group(hpz)
    return deepspeed.zero.Init(
        data_parallel_group=info.grad_group,
        config_dict_or_path=ds_config,
        mpu=_DeepSpeedMPU(),
        zero_param_parallel_group=groups._get_zero_param_intra_parallel_group(),
    )


@torch.no_grad()
def partition_zero3(model: nn.Module, cfg: Config, info: DistInfo, grad_accum: int = 1) -> None:
    """Turn every meta parameter of `model` into an initialised ZeRO-3 parameter, one at a time (see
    the module docstring), and materialise its buffers on `info.device`."""
    from longctx.model.transformer import init_param, param_seed

    if not info.enabled:
        raise ValueError("partition_zero3 partitions over several processes; launch with torchrun")
    init = _zero_init(cfg, info, grad_accum)
    rules = model.init_rules()
    for name, param in list(model.named_parameters()):
        owner, attr = name.rsplit(".", 1) if "." in name else ("", name)
        module = model.get_submodule(owner)
        full = torch.empty(param.shape, dtype=torch.float32, device=info.device)
        kind, std = rules[name]
        init_param(full, kind, std, param_seed(cfg.train.seed, name))
        # Partitions live in the engine's dtype (bf16 on GPU); the fp32 master is made from them.
        new = nn.Parameter(full.to(init.dtype), requires_grad=param.requires_grad)
        del full
        module._parameters[attr] = new
        # Broadcasts rank 0's copy (all ranks hold the same values), keeps this rank's partition and
        # frees the full tensor.
        init._convert_to_zero_parameters([new])
    for module in model.modules():
        for key, buf in module._buffers.items():
            if buf is not None and buf.is_meta:
                module._buffers[key] = torch.empty_like(buf, device=info.device)
    model.init_buffers()
