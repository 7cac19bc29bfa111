"""Reproducible kernel tuning: which config each tuned kernel runs, chosen once and the same everywhere.

A tuned kernel (flash attention, GLA, S2) has a few candidate configs (tiles, warps, stages). Which is
fastest is measured on the GPU the first time a shape class is seen. `LONGCTX_TUNE` decides how:

- `on` (default): time the candidates on first use and keep the choice in memory;
- `cache`: the same, and the choices live in a JSON file per device (`LONGCTX_TUNE_FILE`, default
  `~/.cache/longctx/tune-<device>.json`): later runs read it and time nothing already there;
- `off`: no timing, every kernel runs its default config (the first candidate).

Choosing never communicates: a collective inside a kernel launch would hang the moment ranks launch
different shapes (context-parallel ranks do: the ring skips empty chunk pairs, S2 ranks hold different
block counts). Instead `synchronize()` is a collective the trainer calls at a point every rank reaches
(after the first step): rank 0's choices are broadcast and every rank adopts them, so from then on all
ranks run rank 0's configs (with `cache`, from the first step of the next run on, since rank 0 writes
the file). `pinned` fixes configs outright, for tests.

A candidate that does not fit the GPU (Triton's `OutOfResources`: shared memory or registers) is
skipped; any other error (a compile error) is raised at once.
"""

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

_MODES = ("on", "cache", "off")
_chosen: dict[tuple, Any] = {}
_candidates: dict[tuple, Sequence] = {}
_pins: dict[str, Any] = {}


def mode() -> str:
    value = os.environ.get("LONGCTX_TUNE", "on")
    if value not in _MODES:
        raise ValueError(f"LONGCTX_TUNE must be one of {_MODES}, got {value!r}")
    return value


def device_name(device=None) -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return "cpu"


_target_arch: int | None = None


@contextlib.contextmanager
def target_arch(arch: int | None):
    """Make `device_arch` answer `arch` while the block runs, for tensors on any device: the AOT report
    (`longctx.kernels.aot`) records on CPU tensors the launches a wrapper makes for the GPU it
    compiles for."""
    global _target_arch
    previous, _target_arch = _target_arch, arch
    try:
        yield
    finally:
        _target_arch = previous


def device_arch(device=None) -> int | None:
    """The compute capability of a CUDA device as one number (80 for sm_80, 90 for sm_90), or None
    without CUDA or for a CPU device (inside `target_arch`: its target). Candidate lists and some fixed
    tiles depend on it: a tile that fits sm_90's registers (operands read by wgmma from shared memory)
    can spill on sm_80, where mma.sync takes them from registers."""
    if _target_arch is not None:
        return _target_arch
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def sm8x(arch: int | None) -> bool:
    """An Ampere / Ada target (`device_arch` below 90): mma.sync holds its operands in registers, so a
    tile that fits sm_90's registers can spill there. None (no GPU known) is not."""
    return arch is not None and arch < 90


def cache_file(device=None) -> str:
    default = os.path.join(os.path.expanduser("~"), ".cache", "longctx", f"tune-{device_name(device)}.json")
    return os.environ.get("LONGCTX_TUNE_FILE", default)


def _encode(config) -> Any:
    """Configs are tuples or triton.Config; JSON keeps them as lists / dicts."""
    if hasattr(config, "kwargs"):
        return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}
    return list(config)


def _index_of(encoded, candidates: Sequence) -> int | None:
    for i, c in enumerate(candidates):
        if _encode(c) == encoded:
            return i
    return None


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise ValueError(f"tuning cache {path} is not valid JSON ({e}); delete it to re-tune") from e


def _save(path: str, key: str, encoded) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    entries = _load(path)
    entries[key] = encoded
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(entries, f, indent=1, sort_keys=True)
    os.replace(tmp, path)  # atomic: concurrent runs never read half a file


@contextlib.contextmanager
def pinned(configs: dict[str, Any]):
    """Run the enclosed code with `configs[kernel]` for each named kernel, timing nothing."""
    previous = dict(_pins)
    _pins.update(configs)
    try:
        yield
    finally:
        _pins.clear()
        _pins.update(previous)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _fits_error() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "this config does not fit the GPU"."""
    try:
        from triton.runtime.errors import OutOfResources
    except ImportError:  # pragma: no cover - triton missing
        return ()
    return (OutOfResources,)


def time_candidates(candidates: Sequence, bench: Callable[[Any], float]) -> int:
    """Index of the fastest candidate; configs that do not fit are skipped, other errors raised."""
    timings, skipped = {}, []
    for i, config in enumerate(candidates):
        try:
            timings[i] = bench(config)
        except _fits_error() as e:
            skipped.append(f"{config}: {e}")
    if not timings:
        raise RuntimeError("no candidate config fits this GPU:\n" + "\n".join(skipped))
    return min(timings, key=timings.get)


def choose(kernel: str, shape_class: tuple, candidates: Sequence, bench: Callable[[Any], float]):
    """The config `kernel` runs for `shape_class`, among `candidates` (the first is the default).

    `bench(config)` runs the kernel with `config` and returns its time; it is called only where this
    process tunes (see the module docstring).
    """
    if kernel in _pins:
        return _pins[kernel]
    key = (kernel, *shape_class)
    if key in _chosen:
        return _chosen[key]
    how = mode()
    if how == "off" or len(candidates) == 1:
        _chosen[key] = candidates[0]
        return candidates[0]
    text_key = f"{kernel}|{'|'.join(map(str, shape_class))}|{device_name()}"
    index = None
    if how == "cache":
        cached = _load(cache_file()).get(text_key)
        index = None if cached is None else _index_of(cached, candidates)
    if index is None:
        index = time_candidates(candidates, bench)
        if how == "cache" and (not _distributed() or _rank() == 0):
            _save(cache_file(), text_key, _encode(candidates[index]))
    _chosen[key] = candidates[index]
    _candidates[key] = candidates
    return candidates[index]


def synchronize(group=None) -> int:
    """Make every rank run rank 0's tuned configs (a collective: call it where all ranks are, e.g.
    after the first training step). Returns how many of this rank's choices changed."""
    if not _distributed():
        return 0
    import torch.distributed as dist

    mine = {"|".join(map(str, key)): _encode(config) for key, config in _chosen.items()}
    box = [mine if dist.get_rank(group) == 0 else None]
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast_object_list(box, src=src, group=group)
    changed = 0
    for key in list(_chosen):
        encoded = box[0].get("|".join(map(str, key)))
        index = None if encoded is None else _index_of(encoded, _candidates.get(key, ()))
        if index is not None and _candidates[key][index] is not _chosen[key]:
            _chosen[key] = _candidates[key][index]
            changed += 1
    return changed


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def forget() -> None:
    """Drop the in-memory choices (tests; a new cache file)."""
    _chosen.clear()
    _candidates.clear()


class Tuned:
    """`tuned(configs, key)(jit_fn)`: a `triton.autotune` stand-in whose choice goes through `choose`.

    `kernel[grid](*args, **kwargs)` picks the config for the shape class (the values of the `key`
    arguments and the dtypes of the tensor arguments), then launches `jit_fn` with it. Kernels tuned
    this way must be safe to run repeatedly (no accumulation into their outputs).
    """

    def __init__(self, fn, configs: list, key: list[str], prune=None):
        self.fn, self.configs, self.key, self.prune = fn, list(configs), list(key), prune
        self.__name__ = getattr(fn, "__name__", None) or fn.fn.__name__

    def candidates(self, values: dict, arch: int | None) -> list:
        """The configs the tuner may pick for a launch with these argument values on `sm_<arch>`
        (None: no GPU known): `prune(configs, values, arch)` drops those known not to suit (e.g.
        spilling at this head dim on this architecture); never all of them. The AOT report
        (`longctx.kernels.aot`) calls this with each target it compiles for."""
        if self.prune is None or len(self.configs) == 1:
            return self.configs
        kept = self.prune(self.configs, values, arch)
        return kept or self.configs[:1]

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            values = dict(zip(self.fn.arg_names, args), **kwargs)
            shape_class = tuple(values[k] for k in self.key) + tuple(
                str(v.dtype) for v in args if isinstance(v, torch.Tensor)
            )

            def run(config):
                meta = dict(kwargs, **config.kwargs)
                g = grid(meta) if callable(grid) else grid
                return self.fn[g](*args, **meta, num_warps=config.num_warps, num_stages=config.num_stages)

            def bench(config):
                from triton.testing import do_bench

                return do_bench(lambda: run(config), warmup=5, rep=20)

            device = next(v.device for v in args if isinstance(v, torch.Tensor))
            candidates = self.candidates(values, device_arch(device))
            config = choose(self.__name__, shape_class, candidates, bench)
            return run(config)

        return launch


def tuned(configs: list, key: list[str], prune=None):
    return lambda fn: Tuned(fn, configs, key, prune)
