"""`train.init_from` weights read per shard: each rank reads only the rows of each tensor it keeps.

    source = init_source("runs/base")           # ("checkpoint", path), ("export", dir) or ("hf", dir)
    note = load_init_weights(model, source, param_shapes(model))

`model` is the one the trainer trains: plain parameters (one process, DDP, DeepSpeed ZeRO 0-2),
FSDP2's dim-0-sharded DTensors, or DeepSpeed ZeRO-3 partitions (`longctx.train.zero3`), already
materialised. For an FSDP2 parameter a rank reads rows `local_rows(param)` of the tensor and nothing
else; for a ZeRO-3 one, the elements `flat_range(param)` of the flattened tensor; for a plain one, the
whole tensor.

- `hf:DIR` (any layer letters) and a `longctx export` folder (`config.json` + `model.safetensors`):
  safetensors files are read with plain positioned reads (`SafetensorsFile.read_rows`) straight into
  the parameter (a bounce buffer of the slice only when the dtype or device differ). Not through
  `safe_open`'s `mmap`: the file pages a rank touches would count in its resident memory, next to the
  shard they are copied into, as long as the file is open (measured: about N/W twice, docs/scale.md).
  The parameters of converted layers that the checkpoint lacks start as `longctx.hf.init_converted`
  says, computed on full-size copies of those (small) tensors.
- A run or a checkpoint written by the torch engine: DCP reads into the sharded state dict (each
  rank the stored chunks that overlap its rows, one at a time); into ZeRO-3 partitions, one full
  tensor at a time, of which the rank keeps its elements.
- A checkpoint written by DeepSpeed (ZeRO 1-3): its fp32 master weights, not the module copy in the
  engine dtype, read from the writer's flat partitions (`DeepSpeedPartitions`). Every
  `*_optim_states.pt` is opened with `torch.load(mmap=True)`; each parameter's element range that
  this rank keeps is copied out of the partitions that hold it, so only those pages are read and
  count in its resident memory (the optimizer moments next to them are never touched), and released
  once copied (`host_memory.drop_pages`). The consolidated weights (`deepspeed_full_weights`, DeepSpeed's
  zero_to_fp32) are never made: measured at W=2 for a 305M model, 1087 MiB per rank, 22 MiB
  over N/W + the largest tensor + the process baseline (docs/scale.md).
"""

import json
import os
import struct
from pathlib import Path

import torch

from longctx.train.checkpoint import META, read_meta, resolve_checkpoint
from longctx.train.checkpoint_io import dcp_load
from longctx.train.host_memory import drop_pages
from longctx.train.zero3 import flat_range, is_zero3
from longctx.weights import check_weights

# How to get weights that fit, for init_from's messages.
INIT_FIX = "use the model config they were written with (see their meta.json or config.json)"

EXPORT_CONFIG, EXPORT_WEIGHTS = "config.json", "model.safetensors"
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


class SafetensorsFile:
    """A safetensors file read with positioned reads (no `mmap`): its header, and any rows of a tensor.

    The format: an 8-byte little-endian header length, a JSON header `{name: {dtype, shape,
    data_offsets: [begin, end]}}` (offsets into the data that follows), then the row-major data."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            (size,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
            if size < 0 or size > 100_000_000:
                raise ValueError(f"{str(self.path)!r} is not a safetensors file (bad header length)")
            try:
                header = json.loads(f.read(size))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(
                    f"{str(self.path)!r} is not a safetensors file: its header is not JSON ({e})"
                ) from None
        header.pop("__metadata__", None)
        self.data_start = 8 + size
        self.tensors = header
        end = max((t["data_offsets"][1] for t in header.values()), default=0)
        if self.path.stat().st_size < self.data_start + end:
            raise ValueError(
                f"{str(self.path)!r} is truncated: its header lists {self.data_start + end} bytes, the file "
                f"has {self.path.stat().st_size}; download or write it again"
            )

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> list[int]:
        return list(self.tensors[name]["shape"])

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor, fd: int) -> None:
        """Copy rows `[start, stop)` (of dim 0) of tensor `name` into `out` (of that slice's shape),
        reading only their bytes from the open file descriptor `fd`."""
        shape = self.tensors[name]["shape"]
        row = int(torch.Size(shape[1:]).numel()) if len(shape) > 1 else 1
        self.read_elements(name, start * row, stop * row, out, fd)

    def read_elements(self, name: str, start: int, stop: int, out: torch.Tensor, fd: int) -> None:
        """Copy elements `[start, stop)` of the flattened tensor `name` into `out` (`stop - start`
        elements, any shape), reading only their bytes from the open file descriptor `fd`."""
        info = self.tensors[name]
        if info["dtype"] not in _DTYPES:
            raise ValueError(
                f"{str(self.path)!r}: {name} has dtype {info['dtype']}, which longctx does not read"
            )
        dtype, shape = _DTYPES[info["dtype"]], info["shape"]
        begin, end = info["data_offsets"]
        if end - begin != dtype.itemsize * int(torch.Size(shape).numel()):
            raise ValueError(
                f"{str(self.path)!r}: {name}'s data offsets do not match its shape; the file is damaged"
            )
        assert out.numel() == stop - start, (name, start, stop, out.shape)
        direct = out.device.type == "cpu" and out.dtype == dtype and out.is_contiguous()
        buf = out if direct else torch.empty(out.shape, dtype=dtype)
        view = memoryview(buf.view(-1).view(torch.uint8).numpy()) if buf.numel() else memoryview(b"")
        offset, done = self.data_start + begin + start * dtype.itemsize, 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise ValueError(f"{str(self.path)!r} ends inside {name}; the file is truncated")
            done += n
        if not direct:
            out.copy_(buf)


def _rows(param) -> tuple[int, int]:
    if hasattr(param, "to_local"):
        from longctx.hf.weights import local_rows

        return local_rows(param)
    return 0, param.shape[0] if param.dim() else 1


def _local(param) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


def _full_shape(param) -> list[int]:
    # A ZeRO-3 parameter's own data is empty; its full shape is `ds_shape`.
    return list(getattr(param, "ds_shape", param.shape))


def _keep(param, full: torch.Tensor) -> None:
    """Copy this rank's part of the full-size tensor `full` into `param` (plain, FSDP2 or ZeRO-3)."""
    if is_zero3(param):
        start, stop = flat_range(param)
        param.ds_tensor.narrow(0, 0, stop - start).copy_(full.reshape(-1)[start:stop])
        return
    start, stop = _rows(param)
    _local(param).copy_(full[start:stop] if full.dim() else full)


@torch.no_grad()
def read_safetensors(model, files: list[Path], names: dict[str, str], what: str) -> tuple[set, list]:
    """Read every tensor of `files` that `names` maps (`{file name: parameter name}`) into `model`'s
    parameter, only the rows this rank keeps; return (file names read, file names not in `names`)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded, unexpected = set(), []
    for path in files:
        st = SafetensorsFile(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            for key in st.keys():
                if key not in names:
                    unexpected.append(key)
                    continue
                param = params[names[key]]
                if st.shape(key) != _full_shape(param):
                    raise ValueError(
                        f"{str(path)!r}: {key} has shape {st.shape(key)} but longctx's {names[key]} is "
                        f"{_full_shape(param)}; {what}"
                    )
                if is_zero3(param):
                    start, stop = flat_range(param)
                    st.read_elements(key, start, stop, param.ds_tensor.narrow(0, 0, stop - start), fd)
                else:
                    start, stop = _rows(param)
                    local = _local(param)
                    st.read_rows(key, start, stop, local if local.dim() else local.view(1), fd)
                loaded.add(key)
        finally:
            os.close(fd)
    return loaded, unexpected


class DeepSpeedPartitions:
    """The fp32 master weights of a DeepSpeed ZeRO 1-3 checkpoint (`.../deepspeed`), read one parameter's
    element range at a time: every file is opened with `torch.load(mmap=True)`, so only the pages of
    the elements asked for are read (and counted in the resident memory).

    The layout (the facts `deepspeed.utils.zero_to_fp32` reconstructs from): the model states file
    lists `param_shapes`, one ordered `{name: shape}` per parameter group, and `shared_params`
    (`{name: the name it shares}`); each rank's `*_optim_states.pt` holds one flat fp32 tensor per
    group. ZeRO 1-2 (`single_partition_of_fp32_groups`): a group's parameters flattened one after
    another (plus `param_alignment_paddings`), that vector cut into W equal consecutive partitions.
    ZeRO-3 (`fp32_flat_groups`): each parameter cut on its own into W partitions of
    `ceil(numel / W)` elements; rank r's file holds its partition of every parameter, one after
    another across its groups."""

    def __init__(self, path: Path):
        from deepspeed.utils.zero_to_fp32 import get_model_state_files, get_optim_files

        from longctx.train.checkpoint_io import weights_only_torch_load

        self.path = path
        # weights_only with DeepSpeed's plain classes; a file that pickles anything else is refused.
        with weights_only_torch_load():
            try:
                states = torch.load(get_model_state_files(str(path))[0], map_location="cpu", mmap=True,
                                    weights_only=True)  # fmt: skip
                optims = [
                    torch.load(f, map_location="cpu", mmap=True, weights_only=True)["optimizer_state_dict"]
                    for f in get_optim_files(str(path))
                ]
            except (FileNotFoundError, KeyError) as e:
                raise ValueError(f"DeepSpeed checkpoint {str(path)!r} cannot be read: {e}") from None
        if states.get("frozen_param_shapes"):
            raise ValueError(
                f"DeepSpeed checkpoint {str(path)!r} has frozen parameters, which longctx never writes; "
                "initialise from a longctx run"
            )
        self.stage = int(optims[0]["zero_stage"])
        count = optims[0]["partition_count"]
        self.world = max(count) if isinstance(count, list) else int(count)
        if self.world != len(optims):
            raise ValueError(
                f"DeepSpeed checkpoint {str(path)!r} was written by {self.world} ranks but holds "
                f"{len(optims)} optimizer files; it is incomplete, save it again"
            )
        key = "fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"
        # parts[r][g]: rank r's flat fp32 tensor of group g (mmap-backed, nothing read yet).
        self.parts = [o[key] for o in optims]
        self.shared = dict(states.get("shared_params", {}))
        self.where = {}  # name -> (group, offset, numel): offset in the group's flat vector (ZeRO 1-2)
        rank_offset = 0  # ZeRO-3: offset in each rank's concatenated groups
        paddings = optims[0].get("param_alignment_paddings") if self.stage < 3 else None
        for g, shapes in enumerate(states["param_shapes"]):
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                numel = int(torch.Size(shape).numel())
                if self.stage == 3:
                    self.where[name] = (None, rank_offset, numel)
                    rank_offset += -(-numel // self.world)
                else:
                    self.where[name] = (g, offset, numel)
                    offset += numel + (paddings[g][i] if paddings is not None else 0)
        if self.stage == 3:
            self.group_starts = [0]
            for t in self.parts[0]:
                self.group_starts.append(self.group_starts[-1] + t.numel())

    def numel(self, name: str) -> int:
        return self.where[self.shared.get(name, name)][2]

    def read(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Copy elements `[start, stop)` of the flattened fp32 parameter `name` into `out` (`stop -
        start` elements, any shape), touching only their pages in the partition files."""
        name = self.shared.get(name, name)
        if name not in self.where:
            raise ValueError(f"DeepSpeed checkpoint {str(self.path)!r} does not hold {name}; {INIT_FIX}")
        group, offset, numel = self.where[name]
        assert 0 <= start <= stop <= numel and out.numel() == stop - start, (name, start, stop)
        flat = out.view(-1)
        if self.stage == 3:
            size = -(-numel // self.world)
            for r in range(self.world):
                lo, hi = max(start, r * size), min(stop, (r + 1) * size)
                if lo < hi:
                    self._copy_rank3(r, offset + lo - r * size, hi - lo, flat[lo - start : hi - start])
            return
        size = self.parts[0][group].numel()  # every rank's partition of a group has the same length
        lo = offset + start
        while lo < offset + stop:
            r, within = divmod(lo, size)
            n = min(offset + stop - lo, size - within)
            at = lo - offset - start
            piece = self.parts[r][group][within : within + n]
            flat[at : at + n].copy_(piece)
            drop_pages(piece)
            lo += n

    def _copy_rank3(self, rank: int, at: int, n: int, out: torch.Tensor) -> None:
        # Elements [at, at + n) of rank's groups concatenated (a parameter may straddle two groups).
        done = 0
        for g, tensor in enumerate(self.parts[rank]):
            begin, end = self.group_starts[g], self.group_starts[g + 1]
            lo, hi = max(at + done, begin), min(at + n, end)
            if lo < hi:
                piece = tensor[lo - begin : hi - begin]
                out[done : done + hi - lo].copy_(piece)
                drop_pages(piece)
                done += hi - lo


@torch.no_grad()
def read_deepspeed(model, path: Path) -> None:
    """Read a DeepSpeed checkpoint's fp32 master weights into `model`, each rank only its elements (its
    FSDP2 rows, its ZeRO-3 partition, or the whole tensor of a plain parameter)."""
    ds = DeepSpeedPartitions(path)
    for name, param in model.named_parameters(remove_duplicate=False):
        full = _full_shape(param)
        if ds.numel(name) != int(torch.Size(full).numel()):
            raise ValueError(f"DeepSpeed checkpoint {str(path)!r}: {name} is not of shape {full}; {INIT_FIX}")
        if is_zero3(param):
            start, stop = flat_range(param)
            dest = param.ds_tensor.narrow(0, 0, stop - start)
        else:
            rows, stop_row = _rows(param)
            row = int(torch.Size(full[1:]).numel()) if len(full) > 1 else 1
            start, stop, dest = rows * row, stop_row * row, _local(param)
        if dest.dtype == torch.float32 and dest.device.type == "cpu" and dest.is_contiguous():
            ds.read(name, start, stop, dest)
        else:
            buf = torch.empty(stop - start, dtype=torch.float32)
            ds.read(name, start, stop, buf)
            dest.copy_(buf.view(dest.shape))


@torch.no_grad()
def load_hf_rows(model, source: str | Path) -> list[str]:
    """`longctx.hf.load_hf_weights`, reading only this rank's rows with positioned reads; returns the
    parameters of converted layers the checkpoint did not hold."""
    from longctx.hf.config import HFCheckpointError, hf_dir
    from longctx.hf.weights import _shards, converted_params, hf_names

    path = hf_dir(source)
    names = hf_names(model)
    try:
        loaded, unexpected = read_safetensors(
            model, _shards(path), names, "config.json and the weights disagree"
        )
    except HFCheckpointError:
        raise
    except ValueError as e:
        raise HFCheckpointError(str(e)) from None
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
    return converted_params(path, names, loaded, unexpected)


@torch.no_grad()
def init_converted_rows(model, new: list[str]) -> None:
    """`longctx.hf.init_converted` for a model whose parameters may be sharded: the parameters in
    `new` are gathered whole (they are a converted layer's gates, convolutions and compressors,
    small next to the model), set on those full copies, and each rank keeps its part back."""
    from longctx.hf.convert import init_converted

    swapped = []
    for name in sorted(new):
        owner, attr = name.rsplit(".", 1)
        module = model.get_submodule(owner)
        param = module._parameters[attr]
        if hasattr(param, "to_local"):
            full = param.full_tensor()
        elif is_zero3(param):
            # init_converted overwrites every element of these, so their current values are not needed.
            full = torch.empty(param.ds_shape, dtype=param.ds_tensor.dtype, device=param.ds_tensor.device)
        else:
            continue
        module._parameters[attr] = torch.nn.Parameter(full, requires_grad=False)
        swapped.append((module, attr, param))
    try:
        init_converted(model, new)
    finally:
        for module, attr, param in swapped:
            _keep(param, module._parameters[attr])
            module._parameters[attr] = param


def init_source(path: str) -> tuple[str, str]:
    """What `train.init_from=path` names: ("hf", dir), ("export", dir) or ("checkpoint", path of a
    complete checkpoint); a ValueError saying what a path must hold otherwise."""
    if path.startswith("hf:"):
        return "hf", path[3:]
    folder = Path(path)
    exported = (folder / EXPORT_WEIGHTS).is_file() and (folder / EXPORT_CONFIG).is_file()
    if exported and not (folder / META).exists():
        names = SafetensorsFile(folder / EXPORT_WEIGHTS).keys()
        if any(n.startswith("model.") for n in names):
            raise ValueError(
                f"train.init_from={path}: this is a Hugging Face folder (`longctx export --hf`); "
                f"write train.init_from=hf:{path}"
            )
        return "export", str(folder)
    return "checkpoint", str(resolve_checkpoint(path, "train.init_from"))


@torch.no_grad()
def load_init_weights(model, source: tuple[str, str], shapes: dict[str, list[int]]) -> str:
    """Load the weights of `source` (from `init_source`) into `model`, each rank its rows; `shapes`
    are the model's full parameter shapes. Returns the line the run's log gets."""
    kind, path = source
    fresh = "optimizer, schedule and data start fresh"
    if kind == "hf":
        new = load_hf_rows(model, path)
        init_converted_rows(model, new)
        converted = f"; {len(new)} parameters of converted layers start fresh" if new else ""
        return (
            f"initialised the weights from the Hugging Face checkpoint {path} "
            f"(train.init_from{converted}; {fresh})"
        )
    if kind == "export":
        file = Path(path) / EXPORT_WEIGHTS
        st = SafetensorsFile(file)
        check_weights({k: st.shape(k) for k in st.keys()}, shapes, f"export {path!r}", INIT_FIX)
        names = {n: n for n in dict(model.named_parameters(remove_duplicate=False))}
        read_safetensors(model, [file], names, "the export was written for another model")
        return f"initialised the weights from the export {path} (train.init_from; {fresh})"
    meta = read_meta(path)
    check_weights(meta["params"], shapes, f"checkpoint {path!r}", INIT_FIX)
    if meta["engine"] == "deepspeed":
        read_deepspeed(model, Path(path) / "deepspeed")
    elif any(is_zero3(p) for p in model.parameters()):
        # One full tensor at a time (DCP reads it whole), of which this rank keeps its elements.
        for name, param in model.named_parameters():
            full = torch.empty(_full_shape(param), dtype=torch.float32)
            dcp_load({"model": {name: full}}, Path(path) / "state")
            _keep(param, full)
    else:
        dcp_load({"model": model.state_dict()}, Path(path) / "state")
    return f"initialised the weights from {path} (train.init_from; {fresh})"
