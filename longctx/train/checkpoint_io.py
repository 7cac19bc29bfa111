"""Reading checkpoint tensors without running code, and DeepSpeed's universal conversion.

    shapes = dcp_tensor_shapes(path)                  # a DCP checkpoint's tensors and their full shapes
    dcp_load({"model": sd, "optim": osd}, path)       # load in place, resharding to this layout
    with weights_only_torch_load():                   # DeepSpeed's torch.load calls, made safe
        engine.load_checkpoint(...)

DCP (`torch.distributed.checkpoint`) reads tensors with `torch.load(weights_only=True)`, but its
`.metadata` file with plain `pickle.load`, and values that are not tensors with
`torch.load(weights_only=False)`. Here the metadata goes through an unpickler that admits only DCP's
own metadata classes, and a planner refuses non-tensor values (longctx never writes any). DeepSpeed
calls `torch.load(..., weights_only=False)` throughout; `weights_only_torch_load` forces
`weights_only=True` for the duration, admitting the few plain classes its files hold.
"""

import contextlib
import io
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist


@contextlib.contextmanager
def dcp_errors(path: Path):
    """DCP reports a failure as `CheckpointException` (a BaseException holding every rank's error):
    raise the first rank's error itself, a missing file named."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        rank, (error, _) = next(iter(e.failures.items()))
        if isinstance(error, FileNotFoundError):
            raise FileNotFoundError(f"checkpoint file {error.filename!r} is missing (rank {rank})") from None
        if isinstance(error, Exception):
            raise error from None
        raise ValueError(f"checkpoint {str(path)!r}: rank {rank} failed: {error!r}") from None


@contextlib.contextmanager
def quiet_single_process():
    """DCP warns on every call made without a process group; one-process use is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# Every global a DCP `.metadata` file may name, exactly (module, name): nothing else is looked up, and
# a name is never followed through dots (`metadata.os.system` names no class here).
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "ChunkStorageMetadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "TensorProperties",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for something outside the allow-list."""


class RestrictedUnpickler(pickle._Unpickler):
    """A pure-Python unpickler that resolves only the exact `(module, name)` pairs of `allowed` (plus
    torch dtypes when `("torch", "<dtype>")` is allowed), calls (REDUCE, NEWOBJ) only those, and sets
    state (BUILD) only on instances, never on a class or function it was handed."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, allowed: set[tuple[str, str]], allow_dtypes: bool = True):
        super().__init__(file)
        self.allowed = allowed
        self.allow_dtypes = allow_dtypes
        self.resolved = {}

    def find_class(self, module, name):
        dtype = self.allow_dtypes and module == "torch" and "." not in name
        if dtype:
            dtype = isinstance(getattr(torch, name, None), torch.dtype)
        if "." in name or not ((module, name) in self.allowed or dtype):
            raise UnsafePickleError(f"it names {module}.{name}, which is not on the allow-list")
        import importlib

        obj = getattr(importlib.import_module(module), name)
        self.resolved[id(obj)] = obj
        return obj

    def persistent_load(self, pid):
        raise UnsafePickleError("it holds a persistent id, which this format never does")

    def _callable(self, obj, opcode: str):
        if id(obj) not in self.resolved or self.resolved[id(obj)] is not obj:
            raise UnsafePickleError(f"{opcode} calls {obj!r}, which is not an allow-listed class")

    def load_reduce(self):
        self._callable(self.stack[-2], "REDUCE")
        super().load_reduce()

    def load_newobj(self):
        self._callable(self.stack[-2], "NEWOBJ")
        super().load_newobj()

    def load_newobj_ex(self):
        self._callable(self.stack[-3], "NEWOBJ_EX")
        super().load_newobj_ex()

    def load_build(self):
        target = self.stack[-2]
        if isinstance(target, type) or callable(target) or id(target) in self.resolved:
            raise UnsafePickleError(f"BUILD sets attributes of {target!r}, which is not an instance")
        super().load_build()

    def load_inst(self):
        raise UnsafePickleError("it uses the INST opcode (protocol 0), which this format never does")

    def load_obj(self):
        raise UnsafePickleError("it uses the OBJ opcode (protocol 1), which this format never does")

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.INST[0]] = load_inst
    dispatch[pickle.OBJ[0]] = load_obj


def _refused(error: pickle.UnpicklingError) -> str:
    """What `torch.load(weights_only=True)` refused, without torch's advice to retry unsafely."""
    found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", str(error))
    return f"it holds {found.group(1)}" if found else "it holds objects that are not tensors"


def read_dcp_metadata(file: Path):
    """DCP's `.metadata` at `file`, unpickled through the allow-list; a ValueError naming the file if
    it holds anything else or is damaged."""
    try:
        data = Path(file).read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"checkpoint file {str(file)!r} cannot be read: {e.strerror}") from e
    try:
        return RestrictedUnpickler(io.BytesIO(data), _DCP_METADATA_GLOBALS).load()
    except UnsafePickleError as e:
        raise ValueError(
            f"checkpoint file {str(file)!r} cannot be loaded safely: {e}; longctx unpickles nothing "
            "else (the file is damaged or was crafted to run code)"
        ) from None
    except Exception as e:
        raise ValueError(f"checkpoint file {str(file)!r} is damaged or not DCP metadata: {e!r}") from None


def dcp_reader(path: Path):
    """A `FileSystemReader` whose metadata is read by the restricted unpickler above, and whose errors
    name the file they came from."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        current = None

        def read_metadata(self, *args, **kwargs):
            file = Path(self.path) / ".metadata"
            metadata = read_dcp_metadata(file)
            if not isinstance(metadata, Metadata):
                raise ValueError(f"checkpoint file {str(file)!r} is not DCP metadata but a {type(metadata)}")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def _slice_file(self, file, sinfo):
            self.current = Path(self.path) / sinfo.relative_path
            return super()._slice_file(file, sinfo)

        def read_data(self, *args, **kwargs):
            try:
                return super().read_data(*args, **kwargs)
            except (ValueError, FileNotFoundError):
                raise
            except Exception as e:
                where = str(self.current or self.path)
                if isinstance(e, pickle.UnpicklingError):
                    raise ValueError(
                        f"checkpoint file {where!r} cannot be loaded safely: {_refused(e)}, which longctx "
                        "will not unpickle"
                    ) from None
                raise ValueError(
                    f"checkpoint file {where!r} is damaged: {type(e).__name__}: {str(e).splitlines()[0]}"
                ) from None

    return SafeFileSystemReader(str(path))


def dcp_tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Every tensor a DCP checkpoint holds, with its full shape; anything else is refused."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp_reader(path).read_metadata()
    shapes = {}
    for key, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            raise ValueError(
                f"{str(path)!r}: entry {key!r} is not a tensor; longctx checkpoints hold only tensors"
            )
        shapes[key] = list(md.size)
    return shapes


def dcp_load(state: dict, path: Path, process_group=None) -> None:
    """Load the nested dict of tensors `state` in place from the DCP checkpoint at `path` (resharding
    as needed); every key must be in the checkpoint as a tensor of the same full shape."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class TensorsOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            raise ValueError(
                f"{str(path)!r}: {read_item.dest_index.fqn!r} is not a tensor; refusing to unpickle"
            )

    saved = dcp_tensor_shapes(path)
    flat = {f"{top}.{key}": t for top, sub in state.items() for key, t in sub.items()}
    for key, t in flat.items():
        if key not in saved:
            raise ValueError(
                f"{str(path)!r} has no entry {key!r}: it was written for another model or optimizer"
            )
        if saved[key] != list(t.shape):
            raise ValueError(
                f"{str(path)!r}: {key!r} has shape {saved[key]} in the checkpoint but {list(t.shape)} here"
            )
    with dcp_errors(path), quiet_single_process():
        dcp.load(
            state,
            storage_reader=dcp_reader(path),
            planner=TensorsOnlyPlanner(),
            process_group=process_group,
            no_dist=not dist.is_initialized(),
        )


def dcp_full_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model's full weights from a torch-engine checkpoint's `state/` DCP, on the CPU, in this
    process (it reads every shard; no process group needed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp_reader(path).read_metadata()
    weights = {}
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(md, TensorStorageMetadata):
            weights[key[len("model.") :]] = torch.empty(list(md.size), dtype=md.properties.dtype)
    with dcp_errors(path), quiet_single_process():
        dcp.load({"model": weights}, storage_reader=dcp_reader(path), no_dist=True)
    return weights


def _deepspeed_safe_globals() -> list:
    """The plain classes DeepSpeed's checkpoint files hold (seen in ZeRO 0-3 files, fp32 and bf16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_torch_load():
    """While active, every `torch.load` (DeepSpeed's included) runs with `weights_only=True`."""
    real_load = torch.load
    allowed = _deepspeed_safe_globals()

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            try:
                return real_load(f, *args, **kwargs)
            except pickle.UnpicklingError as e:
                raise ValueError(
                    f"checkpoint file {str(f)!r} cannot be loaded safely: {_refused(e)}, which longctx will "
                    "not unpickle"
                ) from None
            except (OSError, RuntimeError) as e:
                raise ValueError(
                    f"checkpoint file {str(f)!r} cannot be read: {str(e).splitlines()[0]}"
                ) from e

    torch.load = load
    try:
        yield
    finally:
        torch.load = real_load


def deepspeed_full_weights(path: Path) -> dict[str, torch.Tensor]:
    """The fp32 model weights of a DeepSpeed checkpoint directory (`.../deepspeed`), any ZeRO stage."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_torch_load(), contextlib.redirect_stdout(io.StringIO()):
        weights = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    return {k: v.contiguous() for k, v in weights.items()}


def deepspeed_universal(path: Path, info) -> str:
    """Convert `path/deepspeed` to DeepSpeed's universal format once (rank 0; the others wait) and return
    the tag to load: `deepspeed_universal`. Needed when the data x context degree has changed."""
    out = path / "deepspeed_universal"
    if info.is_main and not out.is_dir():
        from argparse import Namespace

        from deepspeed.checkpoint import ds_to_universal

        tmp = path / ".deepspeed_universal.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        args = Namespace(
            input_folder=str(path / "deepspeed"),
            output_folder=str(tmp),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )
        with weights_only_torch_load(), contextlib.redirect_stdout(io.StringIO()):
            ds_to_universal.main(args)
        (path / "latest_universal").unlink(missing_ok=True)
        tmp.rename(out)
    info.barrier()
    return out.name
