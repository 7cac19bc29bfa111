"""The distributed runtime on CPU/gloo: process groups, zigzag sharding, the all-gather dense core,
communication accounting, both engines, multi-node launch and its errors. Every parallel run is
compared with one process."""

import pytest
import torch

from longctx.cli import main
from longctx.config import load_config
from longctx.parallel import SeqLayout, comm_stats, reset_comm_stats, zigzag_shard, zigzag_unshard
from tests.dist_utils import free_port, losses, metrics, run_cli, run_many, spawn


def test_zigzag_layout_and_shard_round_trip():
    x = torch.arange(16)[None]
    shards = [zigzag_shard(x, r, 2) for r in range(2)]
    assert shards[0].tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]]
    assert shards[1].tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert torch.equal(zigzag_unshard(shards), x)
    layout = SeqLayout.zigzag(16, 1, 2)
    assert layout.segments == ((4, 4), (8, 4)) and layout.positions().tolist() == list(range(4, 12))
    with pytest.raises(ValueError, match="multiple of 8"):
        zigzag_shard(torch.arange(12)[None], 0, 4)


def _comm_worker(rank, world):
    from longctx.parallel.comm import all_gather, all_to_all

    reset_comm_stats()
    x = torch.full((3, 5), float(rank), requires_grad=True)
    gathered = all_gather(x, None)  # [P, 3, 5]
    (gathered * torch.arange(world).view(-1, 1, 1)).sum().backward()
    after_gather = comm_stats()
    y = torch.arange(world * 2, dtype=torch.float32) + 100 * rank
    swapped = all_to_all(y.view(world, 2), None)
    return gathered.detach(), x.grad, after_gather, comm_stats(), swapped


@pytest.mark.parametrize("world", [2, 4])
def test_collectives_are_exact_and_counted(world):
    for rank, (gathered, grad, stats, stats2, swapped) in enumerate(spawn(_comm_worker, world)):
        assert torch.equal(gathered[:, 0, 0], torch.arange(world, dtype=torch.float32))
        # Rank r's shard was scaled by r on every one of the `world` ranks: its gradient is world * r.
        assert torch.all(grad == world * rank)
        shard_bytes = 3 * 5 * 4
        assert stats["all_gather"] == (world - 1) * shard_bytes
        assert stats["reduce_scatter"] == (world - 1) * shard_bytes
        assert stats["bytes_sent"] == 2 * (world - 1) * shard_bytes
        assert stats2["all_to_all"] == (world - 1) * 2 * 4
        assert swapped[:, 0].tolist() == [100.0 * j + 2 * rank for j in range(world)]


def _mismatch_worker(rank, world):
    from longctx.train.distributed import DistInfo, check_same_config

    cfg = load_config("configs/tiny.yaml", [f"train.lr={1e-3 if rank == 0 else 2e-3}"])
    try:
        check_same_config(cfg, DistInfo(rank=rank, world_size=world))
    except ValueError as e:
        return str(e)
    return None


def test_ranks_with_different_configs_fail_naming_the_key():
    messages = spawn(_mismatch_worker, 2)
    assert all(m and "train.lr is 0.001 on rank 0 but 0.002 on rank 1" in m for m in messages)


CONFIG = "configs/tiny.yaml"
OVERRIDES = ["model.layers=D", "train.wandb=false", "train.progress=false"]
COMMON = ["--config", CONFIG, *OVERRIDES]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data-cache"))


def train(tmp_path, name, cache, *overrides):
    """One process, in this one (the reference every parallel run is compared with)."""
    run_dir = tmp_path / name
    assert main(["train", *COMMON, f"data.cache_dir={cache}", f"train.run_dir={run_dir}", *overrides]) == 0
    return losses(run_dir)


def assert_close(a, b, rel=1e-4):
    assert len(a) == len(b) and all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b)), (a, b)


SCHEMES = ["ring", "ulysses", "allgather"]
# Data parallelism: 5 steps of batch 2 per rank against one process with batch 4.
DP2 = {
    "ddp": [],
    "deepspeed": ["parallel.engine=deepspeed", "parallel.zero_stage=2"],
    "fsdp": ["parallel.fsdp=true"],
}


HSDP = {
    "hsdp": ["parallel.fsdp=true"],
    "hpz": ["parallel.engine=deepspeed", "parallel.zero_stage=3"],
}
SHORT = ["data.seq_len=128", "train.steps=3"]


# train.init_from read per shard into FSDP2 (2 ranks): weights of a DDP run (DCP, whole tensors), a
# DeepSpeed ZeRO-2 and a ZeRO-3 run (their fp32 partitions, read per rank) and a one-process run's
# export; a learning rate of 1e-30 leaves them unchanged through the one step, so the run's
# checkpoint holds exactly what was loaded.
INIT_FROM = {"from-ddp": "ddp", "from-zero2": "deepspeed", "from-zero3": "zero3", "from-export": "export"}
# DeepSpeed ZeRO-3 at 2 ranks: built on meta, each parameter made and partitioned on its own
# (longctx/train/zero3.py); 5 steps against one process, a fresh 1-step run at learning rate 1e-30
# (its checkpoint holds the initial weights) and init_from read into the partitions (an export folder
# goes through the same safetensors reader as hf:).
ZERO3 = ["parallel.engine=deepspeed", "parallel.zero_stage=3"]
ZERO3_INIT_FROM = {"z3-from-ddp": "ddp", "z3-from-hf": "export-hf", "z3-from-zero2": "deepspeed"}


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory, cache, single_batch_4_dir):
    """Every torchrun-launched run of this module, batched into one launch per process count
    (tests/cp_runs.py: a launch costs each process seconds of imports)."""
    root = tmp_path_factory.mktemp("parallel")
    base = [*OVERRIDES, f"data.cache_dir={cache}"]
    assert main(["export", "--run", str(single_batch_4_dir), "--out", str(root / "export")]) == 0
    assert main(["export", "--hf", "--run", str(single_batch_4_dir), "--out", str(root / "export-hf")]) == 0
    by_nproc = {2: [], 4: []}
    for cp in (2, 4):
        for scheme in SCHEMES:
            overrides = [*base, "train.steps=5", f"parallel.cp={cp}", f"parallel.cp_comm={scheme}"]
            by_nproc[cp].append((root / f"{scheme}-{cp}", overrides, CONFIG))
    for name, extra in DP2.items():
        by_nproc[2].append((root / name, [*base, "train.steps=5", *extra], CONFIG))
        # The same 4 sequences a step as micro-batches of 1 per rank (train.grad_accum).
        accum = ["train.batch_size=1", "train.grad_accum=2"]
        by_nproc[2].append((root / f"{name}-accum", [*base, "train.steps=5", *extra, *accum], CONFIG))
    # (before the runs that init_from it: a launch runs its list in order)
    by_nproc[2].append((root / "zero3", [*base, "train.steps=5", *ZERO3], CONFIG))
    for name, source in INIT_FROM.items():
        load = ["train.steps=1", "train.lr=1e-30", "parallel.fsdp=true", f"train.init_from={root / source}"]
        by_nproc[2].append((root / name, [*base, *load], CONFIG))
    by_nproc[2].append((root / "z3-fresh", [*base, "train.steps=1", "train.lr=1e-30", *ZERO3], CONFIG))
    for name, source in ZERO3_INIT_FROM.items():
        prefix = "hf:" if source == "export-hf" else ""
        load = ["train.steps=1", "train.lr=1e-30", *ZERO3, f"train.init_from={prefix}{root / source}"]
        by_nproc[2].append((root / name, [*base, *load], CONFIG))
    zero3 = ["train.steps=3", "parallel.cp=2", "parallel.engine=deepspeed", "parallel.zero_stage=3"]
    by_nproc[4].append((root / "dp2cp2", [*base, *zero3], CONFIG))
    # HSDP: shard within pairs of ranks, replicate across the two pairs (short sequences: 4 processes).
    for name, extra in HSDP.items():
        by_nproc[4].append(
            (root / name, [*base, *SHORT, "parallel.cp=2", "parallel.dp_replicate=2", *extra], CONFIG)
        )
    for nproc, batch in by_nproc.items():
        run_many(batch, nproc, root)
    return root


@pytest.fixture(scope="module")
def single_5_steps(tmp_path_factory, cache):
    return train(tmp_path_factory.mktemp("single"), "single", cache, "train.steps=5")


@pytest.fixture(scope="module")
def single_batch_4_dir(tmp_path_factory, cache):
    root = tmp_path_factory.mktemp("single4")
    train(root, "single", cache, "train.steps=5", "train.batch_size=4")
    return root / "single"


@pytest.fixture(scope="module")
def single_batch_4(single_batch_4_dir):
    return losses(single_batch_4_dir)


@pytest.mark.slow
@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_context_parallel_dense_equals_one_process(parallel_runs, single_5_steps, scheme, cp):
    assert_close(losses(parallel_runs / f"{scheme}-{cp}"), single_5_steps)
    assert single_5_steps[0] - single_5_steps[-1] > 0.2


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(DP2))
def test_dp2_engines_equal_one_process_with_twice_the_batch(parallel_runs, single_batch_4, engine):
    assert_close(losses(parallel_runs / engine), single_batch_4)


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(DP2))
def test_grad_accum_equals_the_large_batch(parallel_runs, engine):
    accum, large = metrics(parallel_runs / f"{engine}-accum"), metrics(parallel_runs / engine)
    assert_close([r["loss"] for r in accum], [r["loss"] for r in large], rel=1e-5)
    # Every micro-batch's tokens count: 2 ranks x 2 micro-batches x 1 sequence x 512 tokens a step.
    assert [r["tokens"] for r in accum] == [r["tokens"] for r in large] == [2048 * k for k in range(1, 6)]


@pytest.mark.slow
def test_fsdp_meta_init_equals_one_process_weights(parallel_runs, single_batch_4):
    # FSDP2 runs build the model on meta and initialise only their shards; step 1's loss comes before
    # any update, so it shows the initial weights equal the one-process model's.
    for name in ("fsdp", "fsdp-accum"):
        assert losses(parallel_runs / name)[0] == pytest.approx(single_batch_4[0], rel=1e-6)


def assert_same_weights(run_a, run_b):
    from longctx.train.checkpoint import full_weights, latest_checkpoint

    a, b = full_weights(latest_checkpoint(run_a)), full_weights(latest_checkpoint(run_b))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-20), name


@pytest.mark.slow
@pytest.mark.parametrize("name", list(INIT_FROM))
def test_fsdp_init_from_reads_each_rank_its_rows(parallel_runs, single_batch_4_dir, name):
    source = single_batch_4_dir if name == "from-export" else parallel_runs / INIT_FROM[name]
    assert_same_weights(parallel_runs / name, source)
    # Had nothing been loaded, the run would hold its seed's initial weights, which the source's
    # 5 trained steps moved.
    from longctx.model import build_model
    from longctx.train.checkpoint import full_weights, latest_checkpoint

    cfg = load_config(CONFIG, OVERRIDES)
    fresh = build_model(cfg.model, "cpu", seed=cfg.train.seed).state_dict()
    loaded = full_weights(latest_checkpoint(parallel_runs / name))
    assert max((loaded[k] - fresh[k]).abs().max().item() for k in fresh) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HSDP))
def test_hsdp_equals_one_process(parallel_runs, cache, tmp_path, name):
    # dp 2 x cp 2 with batch 2 a rank: one process with batch 4 sees the same sequences.
    single = train(tmp_path, "single", cache, *SHORT, "train.batch_size=4")
    assert_close(losses(parallel_runs / name), single, rel=1e-5)
    if name == "hsdp":
        import torch.distributed.checkpoint as dcp

        # The checkpoint holds each weight once per shard group: 2 row halves, not 4 quarters.
        state = parallel_runs / name / "checkpoints" / "step_0000003" / "state"
        chunks = dcp.FileSystemReader(str(state)).read_metadata().state_dict_metadata
        w1 = chunks["model.layers.0.mlp.w1.weight"].chunks
        assert sorted((c.offsets[0], c.sizes[0]) for c in w1) == [(0, 176), (176, 176)]


@pytest.mark.slow
def test_zero3_meta_init_equals_one_process(parallel_runs, single_batch_4):
    from longctx.model import build_model
    from longctx.train.checkpoint import full_weights, latest_checkpoint

    # The initial weights, exactly: the fresh run's checkpoint after one step at learning rate 1e-30.
    cfg = load_config(CONFIG, OVERRIDES)
    fresh = build_model(cfg.model, "cpu", seed=cfg.train.seed).state_dict()
    saved = full_weights(latest_checkpoint(parallel_runs / "z3-fresh"))
    assert saved.keys() == fresh.keys()
    for name in fresh:
        assert torch.equal(saved[name], fresh[name]), name
    # Step 1's loss comes before any update; the 5 steps train like one process with twice the batch.
    zero3 = losses(parallel_runs / "zero3")
    assert zero3[0] == pytest.approx(single_batch_4[0], rel=1e-6)
    assert_close(zero3, single_batch_4)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZERO3_INIT_FROM))
def test_zero3_init_from_reads_each_rank_its_partition(parallel_runs, single_batch_4_dir, name):
    source = single_batch_4_dir if name == "z3-from-hf" else parallel_runs / ZERO3_INIT_FROM[name]
    assert_same_weights(parallel_runs / name, source)
    # The loaded weights are not the seed's initial ones (which z3-fresh holds).
    from longctx.train.checkpoint import full_weights, latest_checkpoint

    loaded = full_weights(latest_checkpoint(parallel_runs / name))
    fresh = full_weights(latest_checkpoint(parallel_runs / "z3-fresh"))
    assert max((loaded[k] - fresh[k]).abs().max().item() for k in fresh) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("run", ["deepspeed", "zero3"])
def test_init_from_deepspeed_in_one_process_equals_its_consolidated_weights(parallel_runs, run):
    # One process keeps every parameter whole: read from the 2 ranks' fp32 partitions, element ranges
    # of each parameter, against DeepSpeed's own zero_to_fp32 consolidation.
    from longctx.model import build_model
    from longctx.train.checkpoint import latest_checkpoint
    from longctx.train.checkpoint_io import deepspeed_full_weights
    from longctx.train.sharded_load import init_source, load_init_weights

    checkpoint = latest_checkpoint(parallel_runs / run)
    model = build_model(load_config(CONFIG, OVERRIDES).model, "cpu", seed=1)
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    load_init_weights(model, init_source(str(checkpoint)), shapes)
    reference = deepspeed_full_weights(checkpoint / "deepspeed")
    for name, param in model.named_parameters():
        assert torch.equal(param, reference[name]), name


@pytest.mark.slow
def test_dp2_cp2_zero3_on_four_processes(parallel_runs, single_batch_4):
    assert_close(losses(parallel_runs / "dp2cp2"), single_batch_4[:3])


@pytest.mark.slow
def test_two_torchrun_nodes_on_loopback_train_together(tmp_path, cache):
    import subprocess
    import sys

    port = free_port()
    run_dir = tmp_path / "twonode"
    procs = []
    for node in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--node-rank",
            str(node),
            "--nproc-per-node",
            "1",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "-m",
            "longctx",
            "train",
            *COMMON,
            f"data.cache_dir={cache}",
            f"train.run_dir={run_dir}",
            "train.steps=3",
            "parallel.cp=2",
        ]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    single = train(tmp_path, "single", cache, "train.steps=3")
    assert_close(losses(run_dir), single)


def test_launch_errors_are_clear(tmp_path):
    base = ["train", *COMMON, f"train.run_dir={tmp_path}", "train.steps=1"]
    proc = run_cli([*base, "parallel.backend=nccl"])
    assert proc.returncode != 0 and "parallel.backend=nccl needs CUDA GPUs" in proc.stderr
    proc = run_cli([*base, "parallel.cp=2"])
    assert proc.returncode != 0 and "torchrun --nproc-per-node 2" in proc.stderr
    proc = run_cli([*base, "parallel.cp=2"], env={"WORLD_SIZE": "3", "RANK": "0"})
    assert proc.returncode != 0 and "does not divide the world size 3" in proc.stderr
    port = free_port()
    env = {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    proc = run_cli([*base, "parallel.timeout_s=2"], env=env)
    assert proc.returncode != 0 and f"could not join the process group at 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
