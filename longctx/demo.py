"""`make demo`: pretrain, get interrupted and resume, extend the context, and prove recall, end to end.

    python -m longctx.demo              # what `make demo` runs (budget: 15 minutes on 2 idle CPU cores)
    python -m longctx.demo --quick      # a few steps of each stage, to check the plumbing
    python -m longctx.demo --skip-pretrain   # reuse runs/demo-pretrain, redo continue-training and evals

Steps, each an ordinary `longctx` command a user could type (printed before it runs):
1. Pretrain `configs/demo.yaml` (every mixer, passkey mixture) at L tokens, context-parallel over 2
   processes (`torchrun ... parallel.cp=2`) into `runs/demo-pretrain`. Once a checkpoint past halfway
   exists the job is killed, as a preempted job would be, and the same command is started again: it
   resumes from the latest checkpoint.
2. Needle-in-a-haystack on the pretrained model (one process) at L/2, 3L/4, L, 3L/2 and 2L, and at 4L
   with and without the RoPE scaled x4 at evaluation time (extrapolation, reported only).
3. Continue-train `configs/demo-continue.yaml` with RoPE scaling from the pretrained weights
   (`train.init_from`) on a mixture of L and 2L (`data.seq_len_mix`), context-parallel over 2
   processes, into `runs/demo-continue`; it checks validation loss and needles at L and 2L as it goes.
4. The same needle tests on the continued model, context-parallel (`torchrun ... parallel.cp=2`).
5. Held-out perplexity of both models at L and 2L, by position (`longctx eval ppl --compare`).
6. A short RULER-style run on the continued model (`longctx eval ruler`, two tasks at L and 2L, greedy
   generation with the per-mixer caches), its samples split over the processes (data-parallel).
7. A summary: the before/after table (needles at every length, perplexity at L and 2L) against the
   targets (docs/context-extension.md), and the RULER table. A missed target fails the demo.
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
# Acceptance (issue #27): the pretrained model retrieves at L; the extended one at 2L and, without
# forgetting, at L (at most 0.05 below the pretrained model) and at the lengths between that it never
# trained at exactly; its held-out perplexity at L within 5% of the pretrained model's.
TARGET_PRETRAINED_L, TARGET_EXTENDED, TARGET_BETWEEN, MAX_DROP_L, MAX_PPL_RISE = 0.8, 0.9, 0.85, 0.05, 0.05
# Needle lengths as multiples of L (the 4L extrapolation is run separately, with fewer samples and
# depths: it is reported, not a target).
NEEDLE_FACTORS, EXTRAPOLATION_SAMPLES, EXTRAPOLATION_DEPTHS = (0.5, 0.75, 1, 1.5, 2), 4, "0,0.5,1"
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


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def niah_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "niah" / "results.json").read_text())


def ruler_summary(run_dir: Path) -> str:
    from longctx.eval.ruler import ruler_table

    return ruler_table(json.loads((run_dir / "ruler" / "results.json").read_text()))


def needle_means(res: dict) -> dict[int, tuple[float, float]]:
    """`{length: (exact match, per-digit accuracy)}` averaged over depths, from a niah results.json."""
    return {
        length: (float(sum(e) / len(e)), float(sum(d) / len(d)))
        for length, e, d in zip(res["lengths"], res["accuracy"], res["digit_accuracy"])
    }


def summary(
    pre: dict,
    cont: dict,
    ppl: dict,
    extrapolation: dict,
    seq_len: int,
    resumed_from: int,
    minutes: float,
) -> tuple[str, bool]:
    """The before/after table (needle exact match (per-digit) at every length, perplexity at L and
    2L, the 4L extrapolation with and without RoPE x4), the targets, and whether all were met.
    `ppl` is `ppl-compare.json` (pretrained first); `extrapolation` maps (model, scaled) to a niah
    result at 4L (missing entries are left out)."""
    before, after = needle_means(pre), needle_means(cont)
    lengths = sorted(set(before) | set(after))

    def cell(table, length):
        return f"{table[length][0]:.2f} ({table[length][1]:.2f})" if length in table else "-"

    name = {seq_len: "L", 2 * seq_len: "2L"}
    lines = [
        f"summary ({minutes:.1f} min; pretraining was killed and resumed from step {resumed_from})",
        "needle exact match (per-digit), mean over depths:",
        f"{'length':>12}  {'pretrained':>12}  {'extended':>12}",
    ]
    for length in lengths:
        label = f"{length} ({name.get(length, f'{length / seq_len:g}L')})"
        lines.append(f"{label:>12}  {cell(before, length):>12}  {cell(after, length):>12}")
    for (model, scaled), res in sorted(extrapolation.items()):
        exact, digit = needle_means(res)[4 * seq_len]
        how = "RoPE x4 at eval" if scaled else "as trained"
        lines.append(f"{'4L ' + model:>12}  {how:>25}: {exact:.2f} ({digit:.2f})  (reported only)")
    runs = list(ppl)
    ppl_at = {(i, r["seq_len"]): r["overall_ppl"] for i, run in enumerate(runs) for r in ppl[run]}
    lines.append("held-out perplexity:")
    for length in sorted({n for _, n in ppl_at}):
        a, b = ppl_at.get((0, length)), ppl_at.get((1, length))
        if a and b:
            lines.append(f"{length:>12}  {a:>12.2f}  {b:>12.2f}  ({(b / a - 1) * 100:+.1f}%)")
    exact_before = {n: v[0] for n, v in before.items()}
    exact_after = {n: v[0] for n, v in after.items()}
    between = [int(f * seq_len) for f in NEEDLE_FACTORS if f not in (1, 2)]
    ppl_before, ppl_after = ppl_at.get((0, seq_len), 0.0), ppl_at.get((1, seq_len), float("inf"))
    checks = [
        (
            f"pretrained at L={seq_len}: exact >= {TARGET_PRETRAINED_L}",
            exact_before.get(seq_len, 0) >= TARGET_PRETRAINED_L,
        ),
        (
            f"extended at 2L={2 * seq_len}: exact >= {TARGET_EXTENDED}",
            exact_after.get(2 * seq_len, 0) >= TARGET_EXTENDED,
        ),
        (
            f"extended at L={seq_len}: exact >= {TARGET_EXTENDED} and at most {MAX_DROP_L} below the "
            "pretrained model",
            exact_after.get(seq_len, 0) >= TARGET_EXTENDED
            and exact_after.get(seq_len, 0) >= exact_before.get(seq_len, 0) - MAX_DROP_L - 1e-9,
        ),
        (
            f"extended at {', '.join(map(str, between))}: exact >= {TARGET_BETWEEN} at each",
            all(exact_after.get(n, 0) >= TARGET_BETWEEN for n in between),
        ),
        (
            f"extended held-out perplexity at L={seq_len} within {MAX_PPL_RISE:.0%} of the pretrained",
            ppl_after <= ppl_before * (1 + MAX_PPL_RISE),
        ),
    ]
    lines += [f"[{'ok' if ok else 'MISSED'}] {text}" for text, ok in checks]
    return "\n".join(lines), all(ok for _, ok in checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longctx.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of each stage (plumbing check)")
    parser.add_argument("--nproc", type=int, default=2, help="processes per context-parallel job (default 2)")
    parser.add_argument("--root", default="runs", help="where the two run directories go (default runs/)")
    parser.add_argument(
        "--skip-pretrain",
        action="store_true",
        help="reuse ROOT/demo-pretrain (and its needle results) from an earlier demo; redo the rest",
    )
    args = parser.parse_args(argv)
    pretrain, cont = Path(args.root) / "demo-pretrain", Path(args.root) / "demo-continue"
    where = [f"train.run_dir={pretrain}"]
    start = time.perf_counter()
    extra = QUICK if args.quick else []
    # --quick: two samples at one depth, L and 2L only, no extrapolation runs (a plumbing check).
    samples = ["--samples", "2", "--depths", "0.5"] if args.quick else []
    cfg = load_config(PRETRAIN_CONFIG, extra)
    seq_len = cfg.data.seq_len
    factors = (1, 2) if args.quick else NEEDLE_FACTORS
    lengths = ",".join(str(int(f * seq_len)) for f in factors)
    cp = f"parallel.cp={args.nproc}"
    for run_dir in (cont,) if args.skip_pretrain else (pretrain, cont):
        if run_dir.exists():
            print(f"removing the previous demo's {run_dir}/")
            shutil.rmtree(run_dir)
    longctx = [sys.executable, "-m", "longctx"]
    four = 4 * seq_len
    # RoPE scaled x4 over the pretraining length, at evaluation time only.
    x4 = [
        "model.rope.scaling.type=yarn",
        "model.rope.scaling.factor=4",
        f"model.rope.scaling.original_max_len={seq_len}",
    ]

    def extrapolate(launch: list[str], run_dir: Path, more: list[str]) -> None:
        if args.quick:
            return
        for scaled in (False, True):
            out = run_dir / ("niah-4L-x4" if scaled else "niah-4L")
            run(
                [
                    *launch,
                    "eval",
                    "niah",
                    "--run-dir",
                    str(run_dir),
                    "--lengths",
                    str(four),
                    "--samples",
                    str(EXTRAPOLATION_SAMPLES),
                    "--depths",
                    EXTRAPOLATION_DEPTHS,
                    "--out",
                    str(out),
                    "--no-progress",
                    *more,
                    *(x4 if scaled else []),
                ]
            )

    resumed_from = 0
    if args.skip_pretrain:
        banner(f"1/7 reusing the pretrained model of {pretrain} (--skip-pretrain)")
    else:
        banner(f"1/7 pretrain at L={seq_len} tokens, cp={args.nproc}, interrupted and resumed once")
        train = [*_torchrun(args.nproc), "train", "--config", PRETRAIN_CONFIG, cp, *where, *extra]
        resumed_from = pretrain_with_interruption(train, pretrain, interrupt_after=cfg.train.steps // 2)

    done = pretrain / "niah" / "results.json"
    if args.skip_pretrain and done.is_file() and niah_results(pretrain)["lengths"] == _int_list(lengths):
        banner(f"2/7 reusing the pretrained model's needle results in {done.parent}")
    else:
        banner(f"2/7 needle in a haystack on the pretrained model at {lengths} (and {four}: extrapolation)")
        run(
            [
                *longctx,
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
        extrapolate(longctx, pretrain, [])

    banner(f"3/7 continue-train on a mixture of L={seq_len} and 2L={2 * seq_len} with RoPE scaling")
    continued = [f"train.init_from={pretrain}", f"train.run_dir={cont}"]
    run([*_torchrun(args.nproc), "train", "--config", CONTINUE_CONFIG, cp, *continued, *extra])

    banner(f"4/7 needle in a haystack on the continued model, context-parallel (cp={args.nproc})")
    niah = ["eval", "niah", "--run-dir", str(cont), "--no-progress"]
    run([*_torchrun(args.nproc), *niah, "--lengths", lengths, *samples, cp])
    # The x4 override keeps the continued run's YaRN and raises its factor (2 over L) to 4.
    extrapolate(_torchrun(args.nproc), cont, [cp])

    banner(f"5/7 held-out perplexity by position at L={seq_len} and 2L={2 * seq_len}, before and after")
    ppl_lengths = f"{seq_len},{2 * seq_len}"
    batches = ["--batches", "1"] if args.quick else ["--batches", "8"]
    compare = ["--compare", str(pretrain), str(cont), "--lengths", ppl_lengths, *batches, "--no-progress"]
    run([*longctx, "eval", "ppl", *compare])

    banner(f"6/7 RULER-style tasks ({RULER_TASKS}) on the continued model, {args.nproc} processes")
    run(
        [
            *_torchrun(args.nproc),
            "eval",
            "ruler",
            "--run-dir",
            str(cont),
            "--lengths",
            f"{seq_len},{2 * seq_len}",
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

    banner("7/7 summary")
    minutes = (time.perf_counter() - start) / 60
    extrapolation = {}
    for model, run_dir in (("pretrained", pretrain), ("extended", cont)):
        for scaled in (False, True):
            path = run_dir / ("niah-4L-x4" if scaled else "niah-4L") / "results.json"
            if path.is_file():
                extrapolation[(model, scaled)] = json.loads(path.read_text())
    ppl = json.loads((cont / "ppl-compare" / "ppl-compare.json").read_text())
    text, met = summary(
        niah_results(pretrain), niah_results(cont), ppl, extrapolation, seq_len, resumed_from, minutes
    )
    text += "\n\n" + ruler_summary(cont)
    print(text)
    (cont / "demo-summary.txt").write_text(text + "\n")
    print(
        f"\nheatmaps: {pretrain}/niah/heatmap.png, {cont}/niah/heatmap.png, {cont}/ruler/summary.png; "
        f"perplexity: {cont}/ppl-compare/ppl-compare.png; loss by length: {cont}/loss.png"
    )
    # A full demo that misses its targets fails loudly; --quick only checks the plumbing.
    return 0 if met or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
