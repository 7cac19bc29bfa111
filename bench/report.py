"""Turn recorded benchmark results into the performance section of docs/benchmarks.md and a plot.

    longctx bench report                  # every bench/results/*.json -> docs/benchmarks.md section + PNG
    python -m longctx.bench.report --page docs/benchmarks.md --png bench/results/performance.png

The section sits between `<!-- performance:start -->` and `<!-- performance:end -->` and is
rewritten in place: the DESIGN.md targets with the measured value where a GPU run recorded one, the
communication table, and each results file's device, versions and commands.
"""

import argparse
import json
import sys
from pathlib import Path

from longctx.bench.common import RESULTS_DIR

START, END = "<!-- performance:start -->", "<!-- performance:end -->"

# (what, bench, record filter, value field, comparison, threshold)
TARGETS = [
    ("dense fwd+bwd vs SDPA flash, 16k, hd 128", "flash_attn",
     dict(impl="longctx", T=16384, head_dim=128, **{"pass": "fwd+bwd"}), "speedup", ">=", 1.0),
    ("S2 fwd+bwd vs dense, 128k (stride 16, local 512)", "s2_attn",
     dict(impl="s2", T=131072, **{"pass": "fwd+bwd"}), "speedup_vs_dense", ">=", 10.0),
    ("S2 fwd+bwd vs FlexAttention, 128k", "s2_attn",
     dict(impl="s2", T=131072, **{"pass": "fwd+bwd"}), "speedup_vs_flex", ">=", 1.0),
    ("NSA fwd+bwd vs dense, 16k", "nsa", dict(impl="nsa", T=16384), "speedup_vs_dense", ">=", 1.0),
    ("NSA fwd+bwd vs dense, 64k", "nsa", dict(impl="nsa", T=65536), "speedup_vs_dense", ">=", 6.0),
    ("linear fwd+bwd vs flash-linear-attention, 16k", "gla",
     dict(impl="longctx", T=16384, **{"pass": "fwd+bwd"}), "speedup_vs_fla", ">=", 1.0),
    ("ring decomposition vs one dense call, 32k, P=8", "ring",
     dict(T=32768, ranks=8, **{"pass": "fwd+bwd"}), "ratio", "<=", 1.1),
]  # fmt: skip


def load_results(results_dir: Path = RESULTS_DIR) -> list[dict]:
    docs = []
    for path in sorted(Path(results_dir).glob("*.json")):
        doc = json.loads(path.read_text())
        doc["file"] = path.name
        docs.append(doc)
    return docs


def _matches(record: dict, bench: str, where: dict) -> bool:
    return record.get("bench") == bench and all(record.get(k) == v for k, v in where.items())


def targets_table(docs: list[dict]) -> list[str]:
    lines = ["| target | goal | measured | device |", "|---|---|---|---|"]
    for what, bench, where, field, op, threshold in TARGETS:
        found = [
            (d, r) for d in docs for r in d.get("results", []) if _matches(r, bench, where) and field in r
        ]
        goal = f"{op} {threshold:g}x" if field != "ratio" else f"{op} {threshold:g}"
        if not found:
            lines.append(f"| {what} | {goal} | not measured yet (needs a GPU run) | |")
            continue
        doc, rec = found[-1]
        value = rec[field]
        met = value >= threshold if op == ">=" else value <= threshold
        lines.append(f"| {what} | {goal} | {value:.2f} ({'met' if met else 'not met'}) | {doc['device']} |")
    return lines


def comm_table(docs: list[dict]) -> list[str]:
    rows = [r for d in docs for r in d.get("results", []) if r.get("bench") == "comm"]
    if not rows:
        return []
    shape = rows[0]
    lines = [
        f"Bytes one rank sends per layer (forward + backward), T = {shape['T']}, {shape['heads']} heads, "
        f"{shape['kv_heads']} kv heads, head dim {shape['head_dim']}, fp32 (`longctx bench comm`):",
        "",
        "| P | " + " | ".join(f"{r['mixer']} {r['scheme']}" for r in rows if r["P"] == shape["P"]) + " |",
        "|---|" + "---|" * sum(r["P"] == shape["P"] for r in rows),
    ]
    for p in sorted({r["P"] for r in rows}):
        cells = [f"{r['total_bytes'] / 2**20:.2f} MB ({r['vs_ring']:.2f}x)" for r in rows if r["P"] == p]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines += ["", "(in brackets: against the dense ring at the same P)"]
    return lines


def provenance(docs: list[dict]) -> list[str]:
    lines = []
    for d in docs:
        cmds = "; ".join(f"`{c}`" for c in d.get("commands", {}).values())
        lines.append(
            f"- `bench/results/{d['file']}`: {d['device']}, torch {d.get('torch')}, "
            f"triton {d.get('triton')}, {d['date']}; {cmds}"
        )
    return lines


def section(docs: list[dict]) -> str:
    lines = [START, "", "Targets (DESIGN.md), from the recorded results:", "", *targets_table(docs), ""]
    comm = comm_table(docs)
    if comm:
        lines += [*comm, ""]
    lines += ["Recorded results:", "", *provenance(docs), "", END]
    return "\n".join(lines)


def write_readme(readme: Path, text: str) -> None:
    content = readme.read_text()
    if START in content and END in content:
        head, rest = content.split(START, 1)
        content = head + text + rest.split(END, 1)[1]
    else:
        content = content.rstrip("\n") + "\n\n## Performance\n\n" + text + "\n"
    readme.write_text(content)


def plot(docs: list[dict], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comm = [r for d in docs for r in d.get("results", []) if r.get("bench") == "comm"]
    flash = [
        r for d in docs for r in d.get("results", []) if r.get("bench") == "flash_attn" and "tflops" in r
    ]
    panels = [p for p in (comm, flash) if p]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    axes = list(axes[0])
    if comm:
        ax = axes.pop(0)
        for key in dict.fromkeys((r["mixer"], r["scheme"]) for r in comm):
            pts = sorted((r["P"], r["total_bytes"] / 2**20) for r in comm if (r["mixer"], r["scheme"]) == key)
            ax.plot(*zip(*pts), "o-", label=f"{key[0]} {key[1]}")
        ax.set(xlabel="context-parallel ranks P", ylabel="MB sent per layer (fwd+bwd)", yscale="log")
        ax.set_title(f"communication per layer, T={comm[0]['T']}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if flash:
        ax = axes.pop(0)
        for impl in dict.fromkeys(r["impl"] for r in flash):
            pts = sorted((r["T"], r["tflops"]) for r in flash if r["impl"] == impl and r["pass"] == "fwd+bwd")
            ax.plot(*zip(*pts), "o-", label=impl)
        ax.set(xlabel="sequence length", ylabel="TFLOP/s (fwd+bwd)", xscale="log")
        ax.set_title("dense attention")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="longctx bench report", description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=str(RESULTS_DIR))
    parser.add_argument(
        "--page", "--readme", default=str(RESULTS_DIR.parent.parent / "docs" / "benchmarks.md"),
        help="the Markdown page whose performance section is rewritten (default docs/benchmarks.md)",
    )
    parser.add_argument("--png", default=str(RESULTS_DIR / "performance.png"))
    args = parser.parse_args(argv)
    docs = load_results(Path(args.results))
    if not docs:
        print(
            f"no results in {args.results}; run `longctx bench comm` (CPU) or `longctx bench kernels` (GPU)"
        )
        return 1
    text = section(docs)
    write_readme(Path(args.page), text)
    png = plot(docs, Path(args.png))
    print(text)
    print(f"updated {args.page}" + (f" and wrote {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
