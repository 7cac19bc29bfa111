"""Compile every Triton kernel of longctx for a GPU target on a machine without one, and report it.

    python -m longctx.kernels.aot           # all five families, sm_80 + sm_90, hd 64..256, bf16 + fp16
    python -m longctx.kernels.aot --quick   # sm_90 (--arch 80 90: both), hd 128, bf16, first configs
    python -m longctx.kernels.aot --arch 90 --head-dims 128 256 --dtypes bf16 --families flash s2

The CPU tests run the kernels under the Triton interpreter, which checks the numbers but not what only
the GPU compiler decides: register pressure and spills, shared memory per block, operands a matmul
cannot take. This module runs the real launchers of every family (flash attention, S2, NSA, GLA, gated
delta) on tiny CPU tensors with each kernel swapped for a recorder, expands every autotuned launch into
all of its candidate configs (the `triton.autotune` lists and S2's own tuner), then compiles each
distinct launch for the target with `triton.compile` (same constexprs, warps and stages, 16-byte
aligned pointers as the JIT assumes). For each it reads the cubin's resource usage with the `cuobjdump`
Triton ships and prints registers per thread, stack bytes per thread (register spills), shared memory,
and whether a block can launch on the target (shared memory within the per-block limit, registers x
threads within the SM's register file).

It fails (exit 1) when a kernel does not compile, when a launch the code makes cannot launch, or when a
config a tuner may pick spills at head dim <= 128. Spills at larger head dims are reported, not failed:
they cost speed, not correctness. Compiled kernels land in Triton's cache, so a second run is fast.
Needs Triton in compiled mode: run it without `TRITON_INTERPRET=1`.
"""

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

# Dynamic shared memory one block may use (the opt-in maximum), in bytes.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
REGS_PER_SM = 65536
MAX_REGS_PER_THREAD = 255
# The head dims each family accepts among those the report covers (all five take any head dim <= 256,
# padded to a power of two inside the kernels).
HEAD_DIMS = (64, 96, 128, 192, 256)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FAMILIES = ("flash", "s2", "nsa", "gla", "delta")
_TYPES = {
    torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int32: "i32", torch.int64: "i64", torch.bool: "i1", torch.uint8: "u8",
}  # fmt: skip


@dataclasses.dataclass
class Launch:
    """One kernel launch as the launcher makes it, ready to compile for any target."""

    family: str
    module: str  # where the kernel lives
    name: str  # attribute name of the kernel (an Autotuner or a JITFunction)
    signature: dict
    constexprs: dict  # parameter name -> value
    attrs: dict  # parameter index -> [["tt.divisibility", 16]]
    num_warps: int
    num_stages: int
    tunable: bool  # a candidate a tuner picks from (else the launcher's fixed choice)

    def label(self) -> str:
        tiles = ",".join(f"{k}={v}" for k, v in self.constexprs.items() if k.startswith("B") and k != "BD")
        return f"{tiles} w{self.num_warps} s{self.num_stages}"

    def key(self) -> tuple:
        constexprs = tuple(sorted((k, repr(v)) for k, v in self.constexprs.items()))
        signature = tuple(sorted(self.signature.items()))
        return self.module, self.name, signature, constexprs, self.num_warps, self.num_stages


@dataclasses.dataclass
class Result:
    launch: Launch
    arch: int
    head_dim: int
    dtype: str
    regs: int = 0
    stack: int = 0
    shared: int = 0
    can_launch: bool = False
    error: str = ""
    compiled: bool = False  # False: the compile failed (`error` says why)

    @property
    def spills(self) -> bool:
        return self.stack > 0


# ----------------------------------------------------------------------------------------------------------
# Recording the launches


class _Recorder:
    """Stands in for a kernel object: `kernel[grid](*args, **kwargs)` records one launch, or one per
    config when the kernel is a `triton.autotune` wrapper."""

    tunable = False  # set while S2's tuner expands its candidates

    def __init__(self, family, module, name, kernel, out, arch):
        self.family, self.module, self.name, self.kernel, self.out = family, module, name, kernel, out
        self.arch = arch  # the target: a tuner's candidates may depend on it

    def __getitem__(self, grid):
        return self._record

    def _record(self, *args, **kwargs):
        from triton.runtime.autotuner import Autotuner

        from longctx.kernels.common.tuning import Tuned

        if isinstance(self.kernel, (Autotuner, Tuned)):
            configs = self.kernel.configs
            if isinstance(self.kernel, Tuned):
                values = dict(zip(self.kernel.fn.arg_names, args), **kwargs)
                configs = self.kernel.candidates(values, self.arch)
            # What a tuner picks, even from a list pruned to one config for this target.
            tunable = True
            for c in configs:
                merged = dict(kwargs, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                self.out.append(self._launch(self.kernel.fn, args, merged, tunable))
        else:
            self.out.append(self._launch(self.kernel, args, dict(kwargs), tunable=_Recorder.tunable))

    def _launch(self, fn, args, kwargs, tunable):
        num_warps, num_stages = kwargs.pop("num_warps", 4), kwargs.pop("num_stages", 3)
        names = fn.arg_names
        values = dict(zip(names, args), **kwargs)
        constexpr_params = {p.name for p in fn.params if p.is_constexpr}
        signature, constexprs, attrs = {}, {}, {}
        for i, name in enumerate(names):
            value = values[name]
            if name in constexpr_params or value is None:
                signature[name] = "constexpr"
                constexprs[name] = value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + _TYPES[value.dtype]
                attrs[i] = [["tt.divisibility", 16]]
            elif isinstance(value, bool):
                signature[name] = "i1"
            elif isinstance(value, float):
                signature[name] = "fp32"
            elif isinstance(value, int):
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0 and value != 0:
                    attrs[i] = [["tt.divisibility", 16]]
            else:
                raise TypeError(f"{self.name}: cannot record argument {name}={value!r}")
        return Launch(
            self.family, self.module, self.name, signature, constexprs, attrs, num_warps, num_stages, tunable
        )


@contextlib.contextmanager
def _recording(family, kernels, out, arch):
    """Swap each `(module, name)` kernel for a recorder of launches for `sm_<arch>` while the block
    runs."""
    originals = {}
    for module_name, name in kernels:
        module = importlib.import_module(module_name)
        originals[(module, name)] = getattr(module, name)
        setattr(module, name, _Recorder(family, module_name, name, originals[(module, name)], out, arch))
    try:
        yield
    finally:
        for (module, name), kernel in originals.items():
            setattr(module, name, kernel)


def _qkv(t, heads, kv_heads, head_dim, dtype):
    q = torch.randn(1, t, heads, head_dim, dtype=dtype)
    k, v = torch.randn(2, 1, t, kv_heads, head_dim, dtype=dtype)
    return q, k, v


def record_flash(head_dim, dtype, quick, arch):
    from longctx.kernels.flash_attn import triton as fa

    names = ["_attn_fwd_kernel", "_attn_bwd_pre_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"]
    out = []
    variants = [(True, None)] if quick else [(True, None), (True, 64), (False, None)]
    with _recording("flash", [(fa.__name__, n) for n in names], out, arch):
        q, k, v = _qkv(256, 4, 2, head_dim, dtype)
        for causal, window in variants:
            o, lse = fa.attn_fwd(q, k, v, 0, causal, head_dim**-0.5, window)
            fa.attn_bwd(q, q, k, v, q, torch.zeros(1, 4, 256), 0, causal, head_dim**-0.5, window)
    return out


def record_s2(head_dim, dtype, quick, arch):
    from longctx.kernels.s2_attn import triton as s2

    names = ["_s2_fwd_kernel", "_s2_bwd_preprocess_kernel", "_s2_bwd_dq_kernel", "_s2_bwd_dkdv_kernel"]
    out = []
    original = s2._run_tuned

    def expand(name, key, launch, block_size, head_dim, elem_bytes, tiles):
        if tiles is not None:
            return original(name, key, launch, block_size, head_dim, elem_bytes, tiles)
        configs = s2.candidates(name, block_size, head_dim, elem_bytes, arch)
        _Recorder.tunable = True
        try:
            for config in configs:
                launch(config)
        finally:
            _Recorder.tunable = False

    s2._run_tuned = expand
    try:
        with _recording("s2", [(s2.__name__, n) for n in names], out, arch):
            q, k, v = (x.requires_grad_() for x in _qkv(512, 4, 2, head_dim, dtype))
            o, lse = s2.s2_attn_triton(q, k, v, 64, 2, 4, 1, head_dim**-0.5)
            (o.float().sum() + lse.sum()).backward()
            # Per-kv-head block tables (context parallelism's compact buffers): k, v as
            # [B, n * bs, H_kv, D] views of [B, H_kv, n, bs, D], each kv head its own blocks.
            table = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [0, 2, 4, 6, 7, -1, -1, -1]])
            kb, vb = (x.detach().unflatten(1, (8, 64)).permute(0, 3, 1, 2, 4) for x in (k, v))
            k4, v4 = (x.flatten(2, 3).transpose(1, 2).requires_grad_() for x in (kb, vb))
            o, lse = s2.s2_attn_triton(q, k4, v4, 64, 2, 4, 1, head_dim**-0.5, None, table)
            (o.float().sum() + lse.sum()).backward()
    finally:
        s2._run_tuned = original
    if quick:
        out = _first_per_kernel(out)
    return out


def record_nsa(head_dim, dtype, quick, arch):
    from longctx.kernels.nsa.triton import cmp_attn, common, select_attn, select_blocks

    kernels = [
        (select_attn.__name__, "_select_fwd_kernel"),
        (select_attn.__name__, "_select_bwd_dq_kernel"),
        (select_attn.__name__, "_select_bwd_dkdv_kernel"),
        (select_attn.__name__, "_select_bwd_dkdv_sum_kernel"),
        (cmp_attn.__name__, "_cmp_fwd_kernel"),
        (cmp_attn.__name__, "_cmp_bwd_dq_kernel"),
        (cmp_attn.__name__, "_cmp_bwd_dkdv_kernel"),
        (select_blocks.__name__, "_select_blocks_kernel"),
        (common.__name__, "_softmax_delta_kernel"),
    ]
    out = []
    # H=16, H_kv=1 is training's layout (a GQA group of 16); the full run adds a group of 4.
    layouts = [(16, 1)] if quick else [(16, 1), (16, 4)]
    t = 256
    with _recording("nsa", kernels, out, arch):
        for heads, kv_heads in layouts:
            q, k, v = _qkv(t, heads, kv_heads, head_dim, dtype)
            idx = select_attn.normalize_block_idx(
                torch.randint(0, t // 64, (1, t, kv_heads, 16), dtype=torch.int32), 64, t, 0, 0
            )
            o, lse = select_attn.select_attn_fwd(q, k, v, idx, 64, head_dim**-0.5, 0, 0)
            select_attn.select_attn_bwd(q, k, v, idx, q, lse, q, lse, 64, head_dim**-0.5, 0, 0)
            k_cmp, v_cmp = k[:, : t // 16], v[:, : t // 16]
            o, lse = cmp_attn.cmp_attn_fwd(q, k_cmp, v_cmp, 32, 16, head_dim**-0.5, 0)
            cmp_attn.cmp_attn_bwd(q, k_cmp, v_cmp, q, lse, q, lse, 32, 16, head_dim**-0.5, 0)
            select_blocks.select_blocks(q, k_cmp, lse, 32, 16, 64, 16, head_dim**-0.5)
    return out


def record_gla(head_dim, dtype, quick, arch):
    from longctx.kernels.gla import chunk

    names = ["chunk_local_cumsum_kernel", "chunk_fwd_h_kernel", "chunk_fwd_o_kernel", "chunk_bwd_dh_kernel",
             "chunk_bwd_dv_kernel", "chunk_bwd_dqk_kernel"]  # fmt: skip
    out = []
    with _recording("gla", [(chunk.__name__, n) for n in names], out, arch):
        t, h = 256, 2
        q, k, v = _qkv(t, h, h, head_dim, dtype)
        g = torch.zeros(1, t, h)
        state = torch.zeros(1, h, head_dim, head_dim)
        o, hs, b, final = chunk.chunk_gla_fwd(q, k, v, g, head_dim**-0.5, state, 64)
        chunk.chunk_gla_bwd(q, k, v, b, hs, q, state, head_dim**-0.5, 64, True)
    if quick:
        out = _first_per_kernel(out)
    return out


def record_gated_delta(head_dim, dtype, quick, arch):
    from longctx.kernels.gated_delta import chunk

    names = [f"chunk_gated_delta_{n}_kernel" for n in ("fwd", "bwd_dh", "bwd")]
    out = []
    with _recording("delta", [(chunk.__name__, n) for n in names], out, arch):
        t, h = 256, 2
        q, k, v = _qkv(t, h, h, head_dim, dtype)
        g, beta = torch.zeros(1, t, h), torch.zeros(1, t, h)
        state = torch.zeros(1, h, head_dim, head_dim)
        # Training (states kept for the backward, with and without an initial state: CP chunks start
        # from one) and the no-grad forward (decoding prefill, CP's map pass under no_grad).
        variants = [(state, True)] if quick else [(state, True), (None, True), (None, False)]
        states = us = None
        bt = chunk.DEFAULT_CHUNK
        for initial, save in variants:
            _, _, saved = chunk.chunk_gated_delta_fwd(q, k, v, g, beta, head_dim**-0.5, initial, bt, save)
            states, us = saved or (states, us)
        chunk.chunk_gated_delta_bwd(q, k, v, g, beta, states, us, q, state, head_dim**-0.5, bt)
    return out


RECORDERS = {
    "flash": record_flash, "s2": record_s2, "nsa": record_nsa, "gla": record_gla, "delta": record_gated_delta,
}  # fmt: skip


def _first_per_kernel(launches):
    """The fixed launches and the first candidate of each tuned kernel (the quick subset)."""
    seen, out = set(), []
    for launch in launches:
        if launch.tunable and launch.name in seen:
            continue
        seen.add(launch.name)
        out.append(launch)
    return out


def record(family, head_dim, dtype, arch, quick=False) -> list[Launch]:
    """The distinct launches of one family at one head dim and dtype, with the candidates its tuners
    offer on `sm_<arch>`."""
    from longctx.kernels.common.tuning import target_arch

    launches, seen = [], set()
    with target_arch(arch):  # fixed tiles that depend on the GPU (NSA's on sm_8x) are this target's
        recorded = RECORDERS[family](head_dim, dtype, quick, arch)
    for launch in recorded:
        if quick and family == "flash" and launch.tunable and launch.name in {x.name for x in launches}:
            continue
        if launch.key() not in seen:
            seen.add(launch.key())
            launches.append(launch)
    return launches


# ----------------------------------------------------------------------------------------------------------
# Compiling and reading the cubin


def _cuobjdump() -> str:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    found = bundled if os.path.exists(bundled) else shutil.which("cuobjdump")
    if found is None:
        raise RuntimeError("cuobjdump not found: it ships with Triton's NVIDIA backend or the CUDA toolkit")
    return found


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack (spill) bytes per thread and static shared memory of the cubin's kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    if "REG" not in usage:
        raise RuntimeError(f"cannot read cuobjdump -res-usage output:\n{text}")
    return {k: int(v) for k, v in usage.items()}


def compile_launch(launch: Launch, arch: int):
    """`triton.compile` one launch for `sm_<arch>`; returns `(registers, stack bytes, shared bytes)`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner

    from longctx.kernels.common.tuning import Tuned

    kernel = getattr(importlib.import_module(launch.module), launch.name)
    fn = kernel.fn if isinstance(kernel, (Autotuner, Tuned)) else kernel
    names = fn.arg_names
    constexprs = {(names.index(n),): v for n, v in launch.constexprs.items()}
    attrs = {(i,): a for i, a in launch.attrs.items()}
    src = ASTSource(fn=fn, signature=dict(launch.signature), constexprs=constexprs, attrs=attrs)
    options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    usage = resource_usage(compiled.asm["cubin"])
    return usage["REG"], max(usage.get("STACK", 0), usage.get("LOCAL", 0)), compiled.metadata.shared


def check(launch: Launch, arch: int, head_dim: int, dtype: str) -> Result:
    try:
        regs, stack, shared = compile_launch(launch, arch)
    except Exception as e:  # noqa: BLE001 -- report every kernel's failure, then fail the run
        result = Result(launch, arch, head_dim, dtype)
        result.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
        return result
    return _from_usage(launch, arch, head_dim, dtype, regs, stack, shared)


def _from_usage(launch, arch, head_dim, dtype, regs, stack, shared) -> Result:
    """The result of a compiled launch from its resource usage: can a block launch on `sm_<arch>`?"""
    result = Result(launch, arch, head_dim, dtype, regs, stack, shared, compiled=True)
    threads = launch.num_warps * 32
    smem_ok = result.shared <= SMEM_LIMIT.get(arch, SMEM_LIMIT[80])
    regs_ok = result.regs <= MAX_REGS_PER_THREAD and result.regs * threads <= REGS_PER_SM
    result.can_launch = smem_ok and regs_ok
    if not smem_ok:
        result.error = f"shared memory {result.shared} B > {SMEM_LIMIT.get(arch, SMEM_LIMIT[80])} B"
    elif not regs_ok:
        result.error = f"{result.regs} registers x {threads} threads > {REGS_PER_SM}"
    return result


def _check_job(job):
    return check(*job)


# ----------------------------------------------------------------------------------------------------------
# The report


def failures(results: list[Result]) -> list[str]:
    """Why the run fails: compile errors, launches that cannot launch, tunable configs spilling at
    head dim <= 128."""
    out = []
    for r in results:
        where = f"{r.launch.family}/{r.launch.name} sm_{r.arch} hd{r.head_dim} {r.dtype} {r.launch.label()}"
        if not r.can_launch:
            out.append(f"{where}: {r.error}")
        elif r.launch.tunable and r.spills and r.head_dim <= 128:
            out.append(f"{where}: tunable config spills {r.stack} B at head dim <= 128")
    return out


_HEADER = (f"{'family':<6} {'kernel':<28} {'sm':>3} {'hd':>4} {'dtype':<5} {'config':<28} "
           f"{'tune':<4} {'regs':>4} {'spill':>6} {'smem':>7} launch")  # fmt: skip


def row(r: Result) -> str:
    status = "ok" if r.can_launch else f"NO: {r.error}"
    return (f"{r.launch.family:<6} {r.launch.name:<28} {r.arch:>3} {r.head_dim:>4} {r.dtype:<5} "
            f"{r.launch.label():<28} {'yes' if r.launch.tunable else '-':<4} {r.regs:>4} {r.stack:>6} "
            f"{r.shared:>7} {status}")  # fmt: skip


def summary(results: list[Result]) -> str:
    tunable_small = [r for r in results if r.launch.tunable and r.head_dim <= 128]
    spilling_small = sum(r.spills for r in tunable_small)
    spilling_any = sum(r.spills for r in results)
    cannot = sum(not r.can_launch for r in results)
    return (
        f"aot: {len(results)} compiles, {cannot} cannot launch, {spilling_small} of {len(tunable_small)} "
        f"tunable configs spill at hd <= 128, {spilling_any} spilling launches in all"
    )


def family_summary(results: list[Result]) -> list[str]:
    """One line per family: compiles, cannot launch, spilling launches (tunable / all)."""
    lines = []
    for family in dict.fromkeys(r.launch.family for r in results):
        rs = [r for r in results if r.launch.family == family]
        lines.append(
            f"aot: {family:<5} {len(rs):>5} compiles, {sum(not r.can_launch for r in rs)} cannot launch, "
            f"{sum(r.spills for r in rs if r.launch.tunable)} of {sum(r.launch.tunable for r in rs)} tunable "
            f"and {sum(r.spills for r in rs if not r.launch.tunable)} of "
            f"{sum(not r.launch.tunable for r in rs)} fixed launches spill"
        )
    return lines


def cache_path() -> str:
    """Where compile results are kept between runs (`LONGCTX_AOT_CACHE` overrides)."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "longctx", "aot-results.json")
    return os.environ.get("LONGCTX_AOT_CACHE", default)


def cache_key(launch: Launch, arch: int) -> str:
    """The kernel's source hash (Triton's `cache_key`: its source and every jitted function it calls)
    with the launch's constexprs, signature, attributes, warps and stages, the target and Triton's
    version: two launches with equal keys compile to the same kernel."""
    import hashlib

    import triton
    from triton.runtime.autotuner import Autotuner

    from longctx.kernels.common.tuning import Tuned

    kernel = getattr(importlib.import_module(launch.module), launch.name)
    fn = kernel.fn if isinstance(kernel, (Autotuner, Tuned)) else kernel
    attrs = tuple(sorted((i, repr(a)) for i, a in launch.attrs.items()))
    text = repr((fn.cache_key, launch.key(), attrs, arch, triton.__version__))
    return hashlib.sha256(text.encode()).hexdigest()


def _load_cache(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _save_cache(path: str, entries: dict) -> None:
    """Add `entries` to the cache file, keeping what other runs added since this one read it (runs
    for different families or arches may share the file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    cache = _load_cache(path)
    cache.update(entries)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(cache, f)
    os.replace(tmp, path)


def run(
    archs, head_dims, dtypes, families, quick=False, jobs=1, kernels=None, out=sys.stdout, use_cache=True
):
    """Record and compile everything asked; returns the results (one per launch, target, head dim and
    dtype). Launches that compile to the same kernel (equal `cache_key`: e.g. a kernel whose code does
    not depend on the head dim) are compiled once, and results found in the cache file are not
    compiled again; compile errors are never cached."""
    jobs_list = []
    for family in families:
        for dtype in dtypes:
            for head_dim in head_dims:
                for arch in archs:
                    for launch in record(family, head_dim, DTYPES[dtype], arch, quick):
                        if kernels and not any(k in launch.name for k in kernels):
                            continue
                        jobs_list.append((launch, arch, head_dim, dtype))
    keys = [cache_key(launch, arch) for launch, arch, _, _ in jobs_list]
    cache = _load_cache(cache_path()) if use_cache else {}
    todo = {}
    for key, job in zip(keys, jobs_list):
        if key not in cache and key not in todo:
            todo[key] = job
    print(f"aot: {len(jobs_list)} launches, {len(set(keys))} distinct kernels, {len(todo)} to compile "
          f"({len(set(keys)) - len(todo)} from {cache_path() if use_cache else 'no cache'}) with {jobs} "
          "process(es)", file=out, flush=True)  # fmt: skip
    with contextlib.ExitStack() as stack:
        if jobs > 1 and len(todo) > 1:
            import multiprocessing

            context = multiprocessing.get_context("fork")
            pool = stack.enter_context(ProcessPoolExecutor(jobs, mp_context=context))
            done = pool.map(_check_job, todo.values(), chunksize=1)
        else:
            done = (check(*job) for job in todo.values())
        failed = {}
        for key, result in zip(todo, done):
            if not result.compiled:  # a compile error: reported, never cached
                failed[key] = result
                continue
            cache[key] = {"regs": result.regs, "stack": result.stack, "shared": result.shared}
            if use_cache:
                _save_cache(cache_path(), {key: cache[key]})
    print(_HEADER, file=out)
    print("-" * len(_HEADER), file=out, flush=True)
    results = []
    for key, (launch, arch, head_dim, dtype) in zip(keys, jobs_list):
        if key in failed:
            result = dataclasses.replace(failed[key], launch=launch, head_dim=head_dim, dtype=dtype)
        else:
            use = cache[key]
            result = _from_usage(launch, arch, head_dim, dtype, use["regs"], use["stack"], use["shared"])
        print(row(result), file=out, flush=True)
        results.append(result)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=None, help="compute capabilities (80 90)")
    parser.add_argument("--head-dims", type=int, nargs="+", default=None)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None)
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--kernels", nargs="+", default=None, help="only kernels whose name contains one")
    quick = "sm_90, hd 128, bf16: the fixed launches and each tuned kernel's first config"
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--no-cache", action="store_true", help="compile all, ignore the results cache")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot: unset TRITON_INTERPRET: the interpreter compiles nothing", file=sys.stderr)
        return 2
    import triton

    archs = args.arch or ([90] if args.quick else [80, 90])
    head_dims = args.head_dims or ([128] if args.quick else list(HEAD_DIMS))
    dtypes = args.dtypes or (["bf16"] if args.quick else ["bf16", "fp16"])
    start = time.time()
    results = run(
        archs,
        head_dims,
        dtypes,
        args.families,
        args.quick,
        args.jobs,
        args.kernels,
        use_cache=not args.no_cache,
    )
    bad = failures(results)
    for line in family_summary(results):
        print(line)
    for line in bad:
        print("FAILED:", line)
    print(f"{summary(results)}; triton {triton.__version__}, {time.time() - start:.0f} s")
    print("aot:", "passed" if not bad else f"{len(bad)} FAILED")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
