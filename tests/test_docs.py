"""The documentation cannot rot: its commands run, its links resolve, it names every command and key.

- Every fenced block written ```bash tested in README.md and docs/*.md runs with bash, block after
  block in one scratch folder (docs/training-and-config.md first: it trains the run that later pages
  export and evaluate). The folder links the repository's `.venv` and holds a copy of `configs/`
  in which `tiny.yaml` is shrunk to 2 steps of 128 tokens, so each command takes seconds on a CPU.
- Every relative link, and every `#anchor` into a Markdown page, points at something that exists.
- Every `longctx` subcommand of the CLI and every config key is named in the docs.

Run: `.venv/bin/python -m pytest tests/test_docs.py`.
"""

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from longctx.cli import build_parser
from longctx.config import Config

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Pages whose tested blocks run first: they make what the others use (runs/tiny).
FIRST = ["training-and-config.md"]
TESTED = re.compile(r"^```bash tested\n(.*?)^```", re.M | re.S)
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# The shrunk tiny config: the documented command, run for 2 steps of 128 tokens.
TINY = {"train": {"steps": 2, "wandb": False, "progress": False}, "data": {"seq_len": 128}}


def collect_blocks() -> list[tuple[str, str]]:
    """(page:line, script) of every tested block, FIRST pages first, then in page order."""
    order = sorted(PAGES, key=lambda p: (p.name not in FIRST, PAGES.index(p)))
    blocks = []
    for page in order:
        text = page.read_text()
        for m in TESTED.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            blocks.append((f"{page.relative_to(REPO)}:{line}", m.group(1)))
    return blocks


BLOCKS = collect_blocks()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("docs")
    (ws / ".venv").symlink_to(Path(sys.prefix))
    shutil.copytree(REPO / "configs", ws / "configs")
    tiny = ws / "configs" / "tiny.yaml"
    cfg = yaml.safe_load(tiny.read_text())
    for section, values in TINY.items():
        cfg.setdefault(section, {}).update(values)
    tiny.write_text(yaml.safe_dump(cfg))
    return ws


def test_docs_have_tested_blocks():
    pages = {where.split(":")[0] for where, _ in BLOCKS}
    assert "docs/training-and-config.md" in pages, pages
    assert len(BLOCKS) >= 3, BLOCKS


@pytest.mark.parametrize("where,script", BLOCKS, ids=[where for where, _ in BLOCKS])
def test_tested_block_runs(workspace, where, script):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "PATH": f"{workspace / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, f"{where} failed ({proc.returncode}):\n{script}\n{output}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} (.+)$", text, re.M):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    return [m.group(1) for m in LINK.finditer(FENCE.sub("", page.read_text()))]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_link_check_catches_a_broken_link(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Title\n\n[ok](#title) [bad](#nothing) [gone](missing.md)\n")
    assert anchors(page) == {"title"}
    assert links(page) == ["#title", "#nothing", "missing.md"]
    assert slug("The `flex` backend (FlexAttention) and `train.kernels`") == (
        "the-flex-backend-flexattention-and-trainkernels"
    )


def subcommands(parser, prefix=()) -> list[str]:
    """Every subcommand path (`eval niah`), and the benchmarks `bench` takes by name."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append(" ".join((*prefix, name)))
                out += subcommands(sub, (*prefix, name))
        elif action.dest == "which" and action.choices:
            out += [" ".join((*prefix, name)) for name in action.choices]
    return out


def all_docs_text() -> str:
    return re.sub(r"\s+", " ", "\n".join(p.read_text() for p in PAGES))


def test_every_subcommand_is_documented():
    commands = subcommands(build_parser())
    assert {"train", "eval niah", "bench comm", "tokenizer train"} <= set(commands), commands
    text = all_docs_text()
    missing = [c for c in commands if f"longctx {c}" not in text]
    assert not missing, f"not named in README.md or docs/: {', '.join('longctx ' + c for c in missing)}"


def config_keys(obj, prefix="") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += config_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def test_every_config_key_is_in_the_config_table():
    """docs/training-and-config.md's table has one row per section naming each of its keys."""
    text = (REPO / "docs" / "training-and-config.md").read_text()
    missing = []
    cfg = Config()
    for section in dataclasses.fields(cfg):
        row = re.search(rf"^\| `{section.name}` \|(.*)\|$", text, re.M)
        assert row, f"no row for section {section.name!r} in docs/training-and-config.md"
        for key in config_keys(getattr(cfg, section.name)):
            if not re.search(rf"\b{re.escape(key.rsplit('.', 1)[-1])}\b", row.group(1)):
                missing.append(f"{section.name}.{key}")
    assert not missing, f"config keys missing from docs/training-and-config.md: {', '.join(missing)}"
