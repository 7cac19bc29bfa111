"""`make gpu-check`: what anyone with one GPU runs first.

    PYTHONPATH=. python3 -m longctx.bench.gpu_check     # no install, no venv: the machine's own Python

1. `longctx check`: every kernel compiled, forward and backward, against the reference;
2. the GPU-marked tests (`pytest -m gpu`, when pytest is installed);
3. `longctx bench kernels --quick` (16k and 64k), written to `bench/results/<device>-<date>.json`;
4. `longctx bench report`: the targets table of docs/benchmarks.md from every recorded result.

Every step runs (a failed check does not hide the benchmarks); the exit status is non-zero if any
failed. Needs torch and triton; not deepspeed, megatron-core, wandb or datasets.
"""

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def steps() -> list[tuple[str, list[str]]]:
    py = sys.executable
    out = [("longctx check", [py, "-m", "longctx", "check"])]
    # Only the files with GPU tests: the others may import what this machine lacks (deepspeed).
    files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py")
                   if "pytest.mark.gpu" in f.read_text())  # fmt: skip
    if importlib.util.find_spec("pytest") is not None and files:
        out.append(("GPU tests", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files]))
    out.append(("bench kernels --quick", [py, "-m", "longctx", "bench", "kernels", "--quick"]))
    out.append(("bench report", [py, "-m", "longctx", "bench", "report"]))
    return out


def main(argv=None) -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; run it on a GPU machine (make gpu-check)")
        return 1
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    env.pop("TRITON_INTERPRET", None)
    if importlib.util.find_spec("pytest") is None:
        print("gpu-check: pytest is not installed, so the GPU-marked tests are skipped (pip install pytest)")
    results = []
    for name, cmd in steps():
        print(f"\n== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.time()
        code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        results.append((name, code, time.time() - start))
    print("\ngpu-check on", torch.cuda.get_device_name())
    for name, code, seconds in results:
        print(f"  {name:<24} {'ok' if code == 0 else f'FAILED (exit {code})':<18} {seconds:6.0f} s")
    return 1 if any(code for _, code, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
