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
def test_rank0_tunes_and_every_rank_runs_its_choice(rank, monkeypatch):
    """Under torch.distributed rank 0 times and broadcasts; another rank times nothing and runs what
    rank 0 sent (the collective itself is torch's: here it is replaced by rank 0's value)."""
    monkeypatch.setenv("LONGCTX_TUNE", "on")
    sent = []

    def broadcast_object_list(box, src):
        assert src == 0
        if rank == 0:
            sent.append(box[0])
        else:
            box[0] = 1  # what rank 0 chose: candidate 1

    monkeypatch.setattr(tuning, "_distributed", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: rank)
    monkeypatch.setattr(dist, "broadcast_object_list", broadcast_object_list)
    calls = []
    # This rank alone would pick candidate 2.
    times = {c: (1.0 if i == 2 else 2.0) for i, c in enumerate(CANDIDATES)}
    chosen = tuning.choose("k", (7,), CANDIDATES, lambda c: calls.append(c) or times[c])
    if rank == 0:
        assert chosen == CANDIDATES[2] and sent == [2] and calls == CANDIDATES
    else:
        assert chosen == CANDIDATES[1] and calls == []
