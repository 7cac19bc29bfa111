"""A hybrid stack trains context-parallel end to end: 5-step losses of S, N, L, G and LSND models at
cp = 2 and 4 equal one process, and the logged bytes show each mixer's scheme (S2 a fraction of a
dense ring, linear and delta-rule layers independent of the sequence length). The runs pack several
documents per sample with document masking on (`data.doc_mask`, the default), so they are also the
acceptance runs of packed-document training under context parallelism."""

import pytest

from longctx.cli import main
from tests.dist_utils import losses, metrics, run_many

PATTERNS = ["S", "N", "L", "G", "LSND"]
# G at cp=4 is checked at the core level in fp64 (test_cp_mixers); in training, cp=2 only (suite time).
SHORT_LONG = (512, 2048)
CP_RUNS = [(cp, pattern) for cp in (2, 4) for pattern in PATTERNS if (cp, pattern) != (4, "G")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cp-training")
    base = ["train.wandb=false", "train.progress=false", f"data.cache_dir={root / 'cache'}"]
    for pattern in PATTERNS:
        run_dir = root / f"{pattern}-single"
        args = [*base, f"model.layers={pattern}", "train.steps=5", f"train.run_dir={run_dir}"]
        assert main(["train", "--config", "configs/tiny.yaml", *args]) == 0
    # train.kernels=flex (D and S on FlexAttention) against the default kernels, one process and cp=2.
    dsds = [*base, "model.layers=DSDS", "train.steps=3", "data.seq_len=256"]
    for kernels in ("auto", "flex"):
        args = [*dsds, f"train.kernels={kernels}", f"train.run_dir={root / f'DSDS-{kernels}-single'}"]
        assert main(["train", "--config", "configs/tiny.yaml", *args]) == 0
    by_nproc = {2: [], 4: []}
    for cp, pattern in CP_RUNS:
        args = [*base, f"model.layers={pattern}", "train.steps=5", f"parallel.cp={cp}"]
        by_nproc[cp].append((root / f"{pattern}-cp{cp}", args))
    by_nproc[2].append((root / "DSDS-flex-cp2", [*dsds, "train.kernels=flex", "parallel.cp=2"]))
    # Communication: S2 (vert_stride 8, local 1) against the dense ring at cp=4, seq_len 2048.
    s2 = ["model.s2.vert_stride=8", "model.s2.local_blocks=1", "data.seq_len=2048", "train.steps=1"]
    by_nproc[4] += [
        (root / "comm-S", [*base, *s2, "model.layers=S", "parallel.cp=4"]),
        (root / "comm-D2048", [*base, *s2, "model.layers=D", "parallel.cp=4"]),
    ]
    # Linear and delta-rule layers against dense ones at 512 and 2048 tokens, cp=2 (4x the tokens; the
    # dense layer at 4096 tokens was a third of this fixture's time).
    for letter in "LDG":
        for t in SHORT_LONG:
            by_nproc[2].append(
                (root / f"comm-{letter}{t}",
                 [*base, f"model.layers={letter}", f"data.seq_len={t}", "train.steps=1", "parallel.cp=2"])
            )  # fmt: skip
    for nproc, batch in by_nproc.items():
        run_many(batch, nproc, root)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("cp,pattern", CP_RUNS, ids=[f"{p}-{cp}" for cp, p in CP_RUNS])
def test_hybrid_losses_equal_one_process(runs, pattern, cp):
    single, parallel = losses(runs / f"{pattern}-single"), losses(runs / f"{pattern}-cp{cp}")
    assert len(parallel) == 5
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(parallel, single)), (parallel, single)


@pytest.mark.slow
def test_flex_kernels_train_like_the_default(runs):
    default = losses(runs / "DSDS-auto-single")
    for run in ("DSDS-flex-single", "DSDS-flex-cp2"):
        flex = losses(runs / run)
        assert len(flex) == 3
        assert all(abs(a - b) <= 1e-5 for a, b in zip(flex, default)), (run, flex, default)


def _bytes(run_dir) -> int:
    return metrics(run_dir)[0]["comm_bytes"]


@pytest.mark.slow
def test_s2_moves_a_fraction_of_a_dense_ring(runs):
    s2, dense = _bytes(runs / "comm-S"), _bytes(runs / "comm-D2048")
    print(f"cp=4, seq_len 2048: S2 {s2:,} bytes, dense ring {dense:,} bytes ({s2 / dense:.3f}x)")
    assert 0 < s2 <= 0.3 * dense


@pytest.mark.slow
def test_linear_bytes_do_not_grow_with_length(runs):
    short, long = SHORT_LONG
    l_short, l_long = _bytes(runs / f"comm-L{short}"), _bytes(runs / f"comm-L{long}")
    d_short, d_long = _bytes(runs / f"comm-D{short}"), _bytes(runs / f"comm-D{long}")
    print(f"L: {l_short:,} -> {l_long:,} bytes; D: {d_short:,} -> {d_long:,} ({short} -> {long} tokens)")
    assert abs(l_long - l_short) <= 0.1 * l_short
    assert d_long >= 3 * l_long and d_long >= 3 * d_short


@pytest.mark.slow
def test_delta_bytes_do_not_grow_with_length(runs):
    short, long = SHORT_LONG
    g_short, g_long = _bytes(runs / f"comm-G{short}"), _bytes(runs / f"comm-G{long}")
    print(f"G: {g_short:,} -> {g_long:,} bytes ({short} -> {long} tokens)")
    assert g_short > 0 and g_long == g_short


@pytest.mark.slow
def test_runs_mask_several_documents_per_sample(runs):
    # The CP runs above train with data.doc_mask=true (the default) on samples of several documents.
    for run in ("LSND-single", "LSND-cp2"):
        assert "doc_mask: true" in (runs / run / "config.yaml").read_text()
        docs = [m["docs_per_sample"] for m in metrics(runs / run)]
        # Step 1's samples cross a document boundary (1.5 documents a sample on the built-in corpus).
        assert len(docs) == 5 and max(docs) > 1, docs
