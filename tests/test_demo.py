"""`make demo`'s quick form end to end. In its own file so that pytest-xdist (`--dist loadfile`) can
run it, the suite's longest single test, beside the other files rather than after test_eval.py's."""

import json

import pytest

from longctx.config import load_config


@pytest.mark.slow
@pytest.mark.timeout(1500)  # about 150 s on 2 idle cores; a shared, loaded machine took over 600 s
def test_demo_quick_runs_every_stage(tmp_path):
    """`python -m longctx.demo --quick`: pretraining at cp=2 killed once and resumed, needle tests in one
    process and context-parallel, continue-training from the pretrained weights, the RULER step on two
    data-parallel processes, the summary."""
    import subprocess
    import sys

    from tests.dist_utils import REPO

    root = tmp_path / "runs"
    cmd = [sys.executable, "-m", "longctx.demo", "--quick", "--root", str(root)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "killed the job after its checkpoint at step" in done.stdout
    assert "resumed from" in done.stdout  # the restarted trainer's own message
    for name in ("demo-pretrain", "demo-continue"):
        results = json.loads((root / name / "niah" / "results.json").read_text())
        assert results["lengths"] == [256, 512]
        assert (root / name / "niah" / "heatmap.png").is_file()
    cont = load_config(root / "demo-continue" / "config.yaml")
    assert cont.train.init_from == str(root / "demo-pretrain") and cont.model.rope.scaling.type == "yarn"
    assert "summary" in (root / "demo-continue" / "demo-summary.txt").read_text()
    ruler = json.loads((root / "demo-continue" / "ruler" / "results.json").read_text())
    assert ruler["tasks"] == ["passkey", "niah_multikey"] and ruler["processes"] == {"dp": 2, "cp": 1}
    assert "RULER-style suite" in (root / "demo-continue" / "demo-summary.txt").read_text()
    assert cont.data.seq_len_mix == ["256:0.5", "512:0.5"]
    compare = json.loads((root / "demo-continue" / "ppl-compare" / "ppl-compare.json").read_text())
    assert [[r["seq_len"] for r in runs] for runs in compare.values()] == [[256, 512], [256, 512]]
    assert "held-out perplexity" in (root / "demo-continue" / "demo-summary.txt").read_text()
