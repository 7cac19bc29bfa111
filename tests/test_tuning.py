"""Reproducible tuning (`longctx.kernels.common.tuning`): cache file, pins, off mode, rank 0 broadcast,
and the error filter (a config that does not fit is skipped, a compile error is raised)."""

import json
import os

import pytest
import torch.distributed as dist
from triton.runtime.errors import OutOfResources

from longctx.kernels.common import tuning

CANDIDATES = [(64, 64, 4, 2), (128, 64, 8, 2), (32, 32, 4, 3)]
TIMES = {CANDIDATES[0]: 3.0, CANDIDATES[1]: 1.0, CANDIDATES[2]: 2.0}


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGCTX_TUNE_FILE", str(tmp_path / "tune.json"))
    tuning.forget()
    yield
    tuning.forget()


def _bench(calls):
    def bench(config):
        calls.append(config)
        return TIMES[config]

    return bench


def test_fastest_is_chosen_once_per_shape_class(monkeypatch):
    monkeypatch.setenv("LONGCTX_TUNE", "on")
    calls = []
    assert tuning.choose("k", (128, "bf16"), CANDIDATES, _bench(calls)) == CANDIDATES[1]
    assert tuning.choose("k", (128, "bf16"), CANDIDATES, _bench(calls)) == CANDIDATES[1]
    assert calls == CANDIDATES  # timed once
    assert not os.path.exists(os.environ["LONGCTX_TUNE_FILE"])  # "on" writes no file


def test_cache_file_is_written_and_read_by_a_later_run(monkeypatch):
    monkeypatch.setenv("LONGCTX_TUNE", "cache")
    calls = []
    tuning.choose("k", (128, "bf16"), CANDIDATES, _bench(calls))
    entries = json.load(open(os.environ["LONGCTX_TUNE_FILE"]))
    assert list(entries.values()) == [list(CANDIDATES[1])]
    tuning.forget()  # a new process: nothing in memory
    calls.clear()
    # The file says candidate 1; a bench that would now pick candidate 2 is never called.
    never = lambda c: pytest.fail("timed again")
    assert tuning.choose("k", (128, "bf16"), CANDIDATES, never) == CANDIDATES[1]
    # Another shape class is tuned and added next to the first.
    tuning.choose("k", (64, "bf16"), CANDIDATES, _bench(calls))
    assert len(json.load(open(os.environ["LONGCTX_TUNE_FILE"]))) == 2


def test_off_and_pins_time_nothing(monkeypatch):
    monkeypatch.setenv("LONGCTX_TUNE", "off")
    assert tuning.choose("k", (1,), CANDIDATES, lambda c: pytest.fail("timed")) == CANDIDATES[0]
    monkeypatch.setenv("LONGCTX_TUNE", "on")
    with tuning.pinned({"k": CANDIDATES[2]}):
        assert tuning.choose("k", (2,), CANDIDATES, lambda c: pytest.fail("timed")) == CANDIDATES[2]
    monkeypatch.setenv("LONGCTX_TUNE", "sometimes")
    with pytest.raises(ValueError, match="LONGCTX_TUNE"):
        tuning.choose("k", (3,), CANDIDATES, lambda c: 1.0)


def test_configs_that_do_not_fit_are_skipped_and_compile_errors_surface(monkeypatch):
    monkeypatch.setenv("LONGCTX_TUNE", "on")

    def bench(config):
        if config == CANDIDATES[1]:
            raise OutOfResources(300000, 232448, "shared memory")
        return TIMES[config]

    assert tuning.choose("k", (1,), CANDIDATES, bench) == CANDIDATES[2]

    def broken(config):
        raise SyntaxError("a real compile error")

    with pytest.raises(SyntaxError):
        tuning.choose("k", (2,), CANDIDATES, broken)


@pytest.mark.parametrize("rank", [0, 1])
def test_every_rank_adopts_rank0_choices_at_synchronize(rank, monkeypatch):
    """Choosing never communicates (a collective in a launch would hang when ranks launch different
    shapes); `synchronize` broadcasts rank 0's choices and every rank adopts them (the collective
    itself is torch's: here it is replaced by rank 0's value)."""
    monkeypatch.setenv("LONGCTX_TUNE", "on")
    sent = []
    monkeypatch.setattr(tuning, "_distributed", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
    monkeypatch.setattr(dist, "broadcast_object_list", lambda *a, **k: pytest.fail("choose communicated"))
    calls = []
    # Rank 0 measures candidate 1 fastest, rank 1 candidate 2.
    fastest = 1 if rank == 0 else 2
    times = {c: (1.0 if i == fastest else 2.0) for i, c in enumerate(CANDIDATES)}
    chosen = tuning.choose("k", (7,), CANDIDATES, lambda c: calls.append(c) or times[c])
    assert chosen == CANDIDATES[fastest] and calls == CANDIDATES
    # A shape only this rank met stays its own.
    tuning.choose("only-here", (1,), CANDIDATES, lambda c: 1.0)

    def broadcast_object_list(box, src, group=None):
        assert src == 0
        if rank == 0:
            sent.append(dict(box[0]))
        else:
            box[0] = {"k|7": tuning._encode(CANDIDATES[1])}

    monkeypatch.setattr(dist, "broadcast_object_list", broadcast_object_list)
    changed = tuning.synchronize()
    assert tuning.choose("k", (7,), CANDIDATES, lambda c: pytest.fail("timed again")) == CANDIDATES[1]
    assert changed == (0 if rank == 0 else 1)
    if rank == 0:
        assert set(sent[0]) == {"k|7", "only-here|1"}
