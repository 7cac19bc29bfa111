"""`make demo`: pretrain, get interrupted and resume, extend the context, and prove recall, end to end.

    python -m longctx.demo              # what `make demo` runs (about 15 minutes on 2 CPU cores)
    python -m longctx.demo --quick      # a few steps of each stage, to check the plumbing

Steps, each an ordinary `longctx` command a user could type (printed before it runs):
1. Pretrain `configs/demo.yaml` (every mixer, passkey mixture) at L tokens, context-parallel over 2
   processes (`torchrun ... parallel.cp=2`) into `runs/demo-pretrain`. Once a checkpoint past halfway
   exists the job is killed, as a preempted job would be, and the same command is started again: it
   resumes from the latest checkpoint.
2. Needle-in-a-haystack at L and 2L on the pretrained model (one process).
3. Continue-train `configs/demo-continue.yaml` at 2L with RoPE scaling from the pretrained weights
   (`train.init_from`), context-parallel over 2 processes, into `runs/demo-continue`.
4. Needle-in-a-haystack at L and 2L on the continued model, context-parallel (`torchrun ...
   parallel.cp=2`).
5. A short RULER-style run on the continued model (`longctx eval ruler`, two tasks at L and 2L, greedy
   generation with the per-mixer caches), its samples split over the processes (data-parallel).
6. A summary: exact match and per-digit accuracy before and after, against the targets, and the RULER
   table.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from longctx.config import load_config

PRETRAIN_CONFIG, CONTINUE_CONFIG = "configs/demo.yaml", "configs/demo-continue.yaml"
QUICK = ["train.steps=6", "train.ckpt_every=2"]
# Acceptance: recall at L after pretraining, and at 2L after continue-training (above the pretrained).
TARGET_L, TARGET_2L = 0.8, 0.6
# The RULER step: the training format's passkey and a key among distractor keys.
RULER_TASKS, RULER_SAMPLES, RULER_DEPTHS = "passkey,niah_multikey", 8, "0,0.5,1"


def _torchrun(nproc: int) -> list[str]:
    from longctx.train.distributed import torchrun_command

    return torchrun_command(nproc, "longctx")


def _show(cmd: list[str]) -> None:
    """Print `cmd` as a user would type it."""
    text = " ".join(cmd)
    text = text.replace(f"{sys.executable} -m torch.distributed.run", "torchrun")
    text = text.replace(f"{sys.executable} -m longctx", "longctx")
    parts = text.split(" ")
    if "--master-port" in parts:
        i = parts.index("--master-port")
        del parts[i : i + 2]
    print("$ " + " ".join(parts), flush=True)


def run(cmd: list[str], env: dict | None = None) -> None:
    _show(cmd)
    subprocess.run(cmd, check=True, env=env)


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def _checkpoint_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name.split("_")[1]) for p in root.glob("step_*") if (p / "meta.json").is_file())


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # Fields after the command (which may hold spaces) start after the last ')'.
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it. torchrun starts each worker in its own session, so
    killing torchrun's process group would leave the workers training."""
    stack, tree = [pid], []
    while stack:
        p = stack.pop()
        tree.append(p)
        stack.extend(_children(p))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def pretrain_with_interruption(cmd: list[str], run_dir: Path, interrupt_after: int) -> int:
    """Run `cmd`; once a checkpoint at or past step `interrupt_after` is complete, kill the whole job
    (SIGKILL to every process, as a preempted node would), then run `cmd` again to resume. Returns the
    step the resumed run started from (0 if the run ended before it could be interrupted)."""
    _show(cmd)
    job = subprocess.Popen(cmd, start_new_session=True)
    while job.poll() is None:
        done = [s for s in _checkpoint_steps(run_dir) if s >= interrupt_after]
        if done:
            kill_tree(job.pid)
            job.wait()
            print(
                f"\n*** killed the job after its checkpoint at step {done[0]} (a preemption); "
                "starting the same command again ***\n",
                flush=True,
            )
            resumed_from = max(_checkpoint_steps(run_dir))
            run(cmd)
            return resumed_from
        time.sleep(0.2)
    if job.returncode:
        raise subprocess.CalledProcessError(job.returncode, cmd)
    return 0


def niah_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "niah" / "results.json").read_text())


def ruler_summary(run_dir: Path) -> str:
    from longctx.eval.ruler import ruler_table

    return ruler_table(json.loads((run_dir / "ruler" / "results.json").read_text()))


def summary(pre: dict, cont: dict, seq_len: int, resumed_from: int, minutes: float) -> tuple[str, bool]:
    """The closing table (one row per (model, length): exact match and per-digit accuracy, then the
    targets) and whether every target was met."""
    rows = []
    for name, res in (("pretrained", pre), ("continued", cont)):
        for i, length in enumerate(res["lengths"]):
            exact = sum(res["accuracy"][i]) / len(res["accuracy"][i])
            digit = sum(res["digit_accuracy"][i]) / len(res["digit_accuracy"][i])
            rows.append((name, length, exact, digit))
    lookup = {(n, ln): e for n, ln, e, _ in rows}
    checks = [
        (
            f"pretrained at L={seq_len}: exact >= {TARGET_L}",
            lookup.get(("pretrained", seq_len), 0) >= TARGET_L,
        ),
        (
            f"continued at 2L={2 * seq_len}: exact >= {TARGET_2L} and above the pretrained model's",
            lookup.get(("continued", 2 * seq_len), 0) >= TARGET_2L
            and lookup.get(("continued", 2 * seq_len), 0) > lookup.get(("pretrained", 2 * seq_len), 0),
        ),
    ]
    lines = [
        f"summary ({minutes:.1f} min; pretraining was killed and resumed from step {resumed_from})",
        f"{'model':<11} {'length':>6} {'exact':>6} {'per-digit':>9}",
    ]
    lines += [f"{n:<11} {ln:>6} {e:>6.2f} {d:>9.2f}" for n, ln, e, d in rows]
    lines += [f"[{'ok' if ok else 'MISSED'}] {text}" for text, ok in checks]
    return "\n".join(lines), all(ok for _, ok in checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longctx.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of each stage (plumbing check)")
    parser.add_argument("--nproc", type=int, default=2, help="processes per context-parallel job (default 2)")
    parser.add_argument("--root", default="runs", help="where the two run directories go (default runs/)")
    args = parser.parse_args(argv)
    pretrain, cont = Path(args.root) / "demo-pretrain", Path(args.root) / "demo-continue"
    where = [f"train.run_dir={pretrain}"]
    start = time.perf_counter()
    extra = QUICK if args.quick else []
    samples = ["--samples", "2"] if args.quick else []
    cfg = load_config(PRETRAIN_CONFIG, extra)
    seq_len = cfg.data.seq_len
    lengths = f"{seq_len},{2 * seq_len}"
    cp = f"parallel.cp={args.nproc}"
    for run_dir in (pretrain, cont):
        if run_dir.exists():
            print(f"removing the previous demo's {run_dir}/")
            shutil.rmtree(run_dir)

    banner(f"1/6 pretrain at L={seq_len} tokens, cp={args.nproc}, interrupted and resumed once")
    train = [*_torchrun(args.nproc), "train", "--config", PRETRAIN_CONFIG, cp, *where, *extra]
    resumed_from = pretrain_with_interruption(train, pretrain, interrupt_after=cfg.train.steps // 2)

    banner(f"2/6 needle in a haystack on the pretrained model at L={seq_len} and 2L={2 * seq_len}")
    run(
        [
            sys.executable,
            "-m",
            "longctx",
            "eval",
            "niah",
            "--run",
            str(pretrain),
            "--lengths",
            lengths,
            "--no-progress",
            *samples,
        ]
    )

    banner(f"3/6 continue-train at 2L={2 * seq_len} with RoPE scaling, cp={args.nproc}")
    continued = [f"train.init_from={pretrain}", f"train.run_dir={cont}"]
    run([*_torchrun(args.nproc), "train", "--config", CONTINUE_CONFIG, cp, *continued, *extra])

    banner(f"4/6 needle in a haystack on the continued model, context-parallel (cp={args.nproc})")
    run(
        [
            *_torchrun(args.nproc),
            "eval",
            "niah",
            "--run-dir",
            str(cont),
            "--lengths",
            lengths,
            "--no-progress",
            *samples,
            cp,
        ]
    )

    banner(f"5/6 RULER-style tasks ({RULER_TASKS}) on the continued model, {args.nproc} processes")
    run(
        [
            *_torchrun(args.nproc),
            "eval",
            "ruler",
            "--run-dir",
            str(cont),
            "--lengths",
            lengths,
            "--tasks",
            RULER_TASKS,
            "--samples",
            "1" if args.quick else str(RULER_SAMPLES),
            "--depths",
            "0.5" if args.quick else RULER_DEPTHS,
            "--no-progress",
            "parallel.cp=1",
        ]
    )

    banner("6/6 summary")
    minutes = (time.perf_counter() - start) / 60
    text, met = summary(niah_results(pretrain), niah_results(cont), seq_len, resumed_from, minutes)
    text += "\n\n" + ruler_summary(cont)
    print(text)
    (cont / "demo-summary.txt").write_text(text + "\n")
    print(f"\nheatmaps: {pretrain}/niah/heatmap.png, {cont}/niah/heatmap.png, {cont}/ruler/summary.png")
    # A full demo that misses its targets fails loudly; --quick only checks the plumbing.
    return 0 if met or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
