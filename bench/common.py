"""Shared benchmark plumbing: timing with `triton.testing.do_bench`, FLOP counts, and the results file.

Every benchmark returns a list of flat records (dicts) such as
    {"bench": "flash_attn", "impl": "longctx", "pass": "fwd+bwd", "T": 16384, "head_dim": 128,
     "ms": 12.3, "tflops": 290.1}
and `write_results` files them under `bench/results/<device>-<date>.json` next to the device name,
torch and triton versions, the command and the date. Re-running a benchmark replaces its records.
"""

import datetime
import json
import platform
import re
import shlex
import sys
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine()}"


def versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def results_path(date: str | None = None) -> Path:
    date = date or datetime.date.today().isoformat()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name()).strip("-").lower()
    return RESULTS_DIR / f"{slug}-{date}.json"


def do_bench(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of `fn()` on the GPU (warm-up, L2 flush between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def attention_flops(
    batch: int, heads: int, t_q: int, t_k: int, head_dim: int, causal: bool, mode: str
) -> float:
    """FLOPs of softmax attention (two matmuls forward, five backward), halved when causal."""
    fwd = 4 * batch * heads * t_q * t_k * head_dim
    if causal:
        fwd /= 2
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def require_cuda(bench: str) -> bool:
    """Print why a GPU benchmark is skipped and return False when there is no CUDA device."""
    if torch.cuda.is_available():
        return True
    print(f"{bench}: skipped, no CUDA device here (this benchmark times GPU kernels)", file=sys.stderr)
    return False


def write_results(
    bench: str, records: list[dict], path: Path | None = None, command: str | None = None
) -> Path:
    """Add (or replace) `bench`'s records in the results file of this device and date."""
    path = Path(path) if path else results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc.update({"device": device_name(), "date": datetime.date.today().isoformat(), **versions()})
    doc.setdefault("commands", {})[bench] = command or " ".join(shlex.quote(a) for a in sys.argv)
    kept = [r for r in doc.get("results", []) if r.get("bench") != bench]
    doc["results"] = kept + records
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    return path
