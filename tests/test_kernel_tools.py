"""The kernel tools a user runs: `python -m longctx.kernels.aot`, `longctx check`, and both from a
source tree without an install and without the training-only packages (what `make gpu-check` does on
a GPU machine's own Python)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longctx.kernels import check

ROOT = Path(__file__).resolve().parent.parent

# Runs a module from the source tree as a bare Python would: the editable install's finder removed,
# deepspeed / megatron / wandb / datasets unimportable.
HIDDEN = """
import runpy, sys
root = sys.argv[1]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "")]
sys.path_importer_cache.clear()
sys.path[:] = [p for p in sys.path if p not in ("", root)]
sys.path.insert(0, root)
sys.modules.update(dict.fromkeys(["deepspeed", "megatron", "wandb", "datasets"]))
import longctx.kernels, longctx.kernels.aot, longctx.bench.kernels, longctx.bench.gpu_check
assert longctx.kernels.__file__ == root + "/kernels/__init__.py", longctx.kernels.__file__
sys.argv = ["longctx", *sys.argv[2:]]
runpy.run_module("longctx", run_name="__main__", alter_sys=True)
"""


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_aot_quick_compiles_every_family_for_sm80_and_sm90():
    """Each family's heaviest backward kernel (as the launcher calls it, with the candidates its tuner
    offers on each target) compiles for sm_80 and sm_90 without a GPU, within the shared memory, and
    no tunable config spills; the gated delta kernels (one fixed config each, no tuner) spill nowhere
    either, forward included. The whole quick subset: `python -m longctx.kernels.aot --quick --arch 80 90`."""
    kernels = ["_attn_bwd_dkdv", "_s2_bwd_dkdv", "_cmp_bwd_dq", "chunk_bwd_dqk", "gated_delta_bwd_kernel",
               "gated_delta_fwd_kernel"]  # fmt: skip
    cmd = [sys.executable, "-m", "longctx.kernels.aot", "--quick", "--arch", "80", "90", "--jobs", "2",
           "--kernels", *kernels]  # fmt: skip
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=ROOT)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    for family in ("flash", "s2", "nsa", "gla", "delta"):
        rows = [line.split() for line in out.splitlines() if line.startswith(f"{family} ")]
        assert sorted({row[2] for row in rows}) == ["80", "90"], (family, out[-2000:])
    assert " 0 cannot launch, 0 of " in out and "aot: passed" in out, out[-2000:]
    delta = r"aot: delta +(\d+) compiles, 0 cannot launch, 0 of 0 tunable and 0 of \1 fixed"
    assert re.search(delta, out), out[-2000:]


@pytest.mark.slow
def test_check_from_a_source_tree_without_training_packages(tmp_path):
    """`longctx check` on CPU says it runs the interpreter, and passes (GLA: the quickest op); it
    records the result in the check cache that `train.kernels=auto` reads."""
    cmd = [sys.executable, "-c", HIDDEN, str(ROOT), "check", "--ops", "gla"]
    cache = tmp_path / "check.json"
    env = {**_env(), "LONGCTX_CHECK_CACHE": str(cache)}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "no GPU here" in out and "interpreter" in out and "passed" in out, out
    assert json.loads(cache.read_text())["cpu-interpreter"]["ops"] == {"gla": True}


def test_check_fails_when_a_kernel_is_off():
    """The bound can fail: a 'kernel' 3% off the reference does not pass, an exact one does."""
    import longctx.kernels as K

    def op(x):
        scale = 1.03 if K.get_backend() == "triton" else 1.0
        return (torch.softmax(x, -1) * scale,)

    x = torch.randn(4, 64, requires_grad=True)
    rows = check.compare("fake", "4x64", op, [x], ["o"], ["dx"])
    assert [r[5] for r in rows] == [False, False]
    exact = check.compare("fake", "4x64", lambda x: (torch.softmax(x, -1),), [x], ["o"], ["dx"])
    assert all(r[5] for r in exact)


def test_flash_dkdv_tuner_offers_only_the_wide_tiles_above_head_dim_128(monkeypatch):
    """At head dim 256 the dK/dV tuner picks among the 32-key tiles the AOT report found spill-free;
    at head dims <= 128 among the others (which spill at 256), on sm_80 only the 64-key ones."""
    import triton

    # Imported as the interpreter tests import it (its module-level configs depend on the mode).
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    from longctx.kernels.flash_attn import triton as fa

    tiles = [(32, 128, 8, 2), *fa._DKDV_AMPERE, *fa._DKDV_WIDE]
    configs = [triton.Config({"BM": m, "BN": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]
    def picked(head_dim, arch):
        return [fa._config_key(c) for c in fa._DKDV_PRUNE(configs, {"HEAD_DIM": head_dim}, arch)]

    assert picked(256, 90) == picked(192, 80) == fa._DKDV_WIDE
    assert picked(128, 90) == picked(64, None) == [(32, 128, 8, 2), (16, 64, 4, 3)]
    assert picked(128, 80) == picked(64, 86) == fa._DKDV_AMPERE
    # hd 96 (padded to 128) on sm_8x: 32x64 w4 s2 spills there (the full AOT matrix), 16x64 does not.
    assert picked(96, 80) == picked(96, 86) == [(16, 64, 4, 3)]


def test_flash_forward_and_dq_keep_only_launchable_tiles_per_head_dim_and_arch(monkeypatch):
    """At head dim 256 the forward and dQ tuners offer only the tiles that fit the shared memory and
    do not spill (AOT, docs/kernels.md); at head dims <= 128 every candidate on sm_90 (or without a
    GPU), on sm_80 only those that do not spill there."""
    import triton

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    from longctx.kernels.flash_attn import triton as fa

    kernels = ((fa._FWD_PRUNE, fa._FWD_WIDE, fa._FWD_AMPERE, [(128, 64, 8, 3), (64, 64, 4, 3)]),
               (fa._DQ_PRUNE, fa._DQ_WIDE, fa._DQ_AMPERE, [(128, 64, 8, 2), (64, 64, 4, 2)]))  # fmt: skip
    for prune, wide, ampere, sm90_only in kernels:
        tiles = list(dict.fromkeys([*sm90_only, *ampere, *wide]))
        configs = [triton.Config({"BM": m, "BN": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]
        sm90 = list(dict.fromkeys([*sm90_only, *(ampere if prune is fa._DQ_PRUNE else []), *wide]))
        assert [fa._config_key(c) for c in prune(configs, {"HEAD_DIM": 256}, 90)] == wide
        assert [fa._config_key(c) for c in prune(configs, {"HEAD_DIM": 128}, 90)] == sm90
        assert [fa._config_key(c) for c in prune(configs, {"HEAD_DIM": 128}, None)] == sm90
        assert [fa._config_key(c) for c in prune(configs, {"HEAD_DIM": 128}, 80)] == ampere
    fwd = [triton.Config({"BM": m, "BN": n}, num_warps=w, num_stages=s) for m, n, w, s in fa._FWD_AMPERE]
    # hd 96 on sm_80: the forward's 64x64 w8 s2 spills (the full AOT matrix); w8 s3 is kept.
    assert [fa._config_key(c) for c in fa._FWD_PRUNE(fwd, {"HEAD_DIM": 96}, 80)] == [(64, 64, 8, 3)]


def test_s2_tuner_leaves_out_the_tiles_that_spill_on_each_arch(monkeypatch):
    """S2's candidates at hd 128 in bf16: none of those the AOT report found spilling on sm_80 is
    offered there (docs/kernels.md); sm_90 (and no GPU) keep their own list, sm_80's is a subset."""
    # Imported as the interpreter tests import it (the kernels are built for the mode of first import).
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    from longctx.kernels.s2_attn import triton as s2

    spilled_sm80 = {
        "fwd": [(128, 32, 8, 2), (128, 32, 8, 3), (64, 32, 4, 2), (64, 32, 4, 3)],
        "dq": [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2),
               (128, 32, 8, 3), (64, 32, 4, 2), (64, 32, 4, 3), (64, 32, 8, 2), (64, 32, 8, 3)],
    }  # fmt: skip
    for name in ("fwd", "dq", "dkdv"):
        sm80, sm90 = s2.candidates(name, 64, 128, 2, 80), s2.candidates(name, 64, 128, 2, 90)
        assert sm90 == s2.candidates(name, 64, 128, 2, None)
        assert sm80 and set(sm80) <= set(sm90) and not set(sm80) & set(spilled_sm80.get(name, []))
        assert set(spilled_sm80.get(name, [])) <= set(sm90) - set(sm80)
    assert s2.candidates("dq", 64, 128, 2, 80)[0] == (64, 64, 8, 2)
    # hd 96 (padded to 128): a few more spill there (the full AOT matrix), and only there.
    padded = {("fwd", 80): [(64, 32, 8, 2), (64, 32, 8, 3), (32, 64, 8, 2)], ("dq", 90): [(32, 64, 8, 2)]}
    for (name, arch), spilled in padded.items():
        at_96, at_128 = s2.candidates(name, 64, 96, 2, arch), s2.candidates(name, 64, 128, 2, arch)
        assert set(spilled) <= set(at_128) and set(at_128) - set(at_96) == set(spilled), (name, arch)


def test_aot_records_nsa_fixed_tiles_for_each_target():
    """NSA's fixed tiles depend on the GPU: the AOT report records them for the target it compiles for
    (`tuning.target_arch`), not for the CPU it runs on. On sm_8x the compressed forward / dQ take 64
    rows and block selection 8 warps (128 rows and 4 warps spill there, GQA group 4, hd 128); sm_90
    keeps 128 rows and 4 warps; outside the recording nothing is overridden. In a process of its own:
    the kernels are recorded compiled, as the report does, not as this session's interpreter builds
    them."""
    script = """
import json, torch
from longctx.kernels import aot
from longctx.kernels.common import tuning
out = {}
for arch in (80, 90):
    for launch in aot.record("nsa", 128, torch.bfloat16, arch):
        if launch.name in ("_cmp_fwd_kernel", "_cmp_bwd_dq_kernel", "_select_blocks_kernel"):
            c = launch.constexprs
            out.setdefault(f"{arch} {launch.name}", []).append([c["BG"] * c["BT"], launch.num_warps])
out["cpu"] = tuning.device_arch(torch.device("cpu"))
print(json.dumps(out))
"""
    cmd = [sys.executable, "-c", script]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    tiles = json.loads(result.stdout.strip().splitlines()[-1])
    assert {tuple(x) for x in tiles["80 _cmp_fwd_kernel"] + tiles["80 _cmp_bwd_dq_kernel"]} == {(64, 8)}
    assert {tuple(x) for x in tiles["90 _cmp_fwd_kernel"] + tiles["90 _cmp_bwd_dq_kernel"]} == {(128, 8)}
    assert {tuple(x) for x in tiles["80 _select_blocks_kernel"]} == {(64, 8)}
    assert {tuple(x) for x in tiles["90 _select_blocks_kernel"]} == {(64, 4)}
    assert tiles["cpu"] is None


def test_gla_tuners_leave_out_the_configs_that_spill_on_each_arch(monkeypatch):
    """GLA's tuners offer none of the configs the full AOT matrix found spilling (hd <= 128, bf16 and
    fp16): dQ/dK with 64-wide value tiles on 4 warps anywhere and at all on sm_8x, and one config each
    of fwd_o, bwd_dh and bwd_dv on sm_8x; everything else stays, and the first candidate stays first."""
    import triton

    # Imported as the interpreter tests import it (the kernels are built for the mode of first import).
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    from longctx.kernels.gla import chunk

    def grid(tiles):
        out = [{}]
        for name, sizes in tiles.items():
            out = [{**c, name: s} for c in out for s in sizes]
        return [triton.Config(c, num_warps=w, num_stages=s) for c in out for w in (4, 8) for s in (2, 3)]

    def key(c):
        return tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages

    def dropped(prune, configs, arch):
        kept = prune(configs, {}, arch)
        assert kept[0] is configs[0]
        return {key(c) for c in configs} - {key(c) for c in kept}

    dqk = grid({"BV": [32, 64]})
    bv64 = {key(c) for c in dqk if c.kwargs["BV"] == 64}
    assert dropped(chunk._BWD_DQK_PRUNE, dqk, 90) == {k for k in bv64 if k[1] == 4}
    assert dropped(chunk._BWD_DQK_PRUNE, dqk, 80) == bv64
    wide = grid({"BK": [32, 64], "BV": [32, 64, 128]})
    assert dropped(chunk._FWD_O_PRUNE, wide, 80) == {((("BK", 64), ("BV", 128)), 4, 3)}
    assert dropped(chunk._BWD_DV_PRUNE, wide, 86) == {((("BK", 32), ("BV", 64)), 8, 3)}
    assert dropped(chunk._BWD_DH_PRUNE, grid({"BK": [32, 64], "BV": [32, 64]}), 80) == {
        ((("BK", 64), ("BV", 64)), 4, 3)
    }
    for prune in (chunk._FWD_O_PRUNE, chunk._BWD_DV_PRUNE, chunk._BWD_DH_PRUNE):
        assert dropped(prune, wide, 90) == dropped(prune, wide, None) == set()
