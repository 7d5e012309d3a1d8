"""ZarrChunkDatasource / RayShardedLoader on a small store, against one module-scoped loopback Ray cluster."""

import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from ray.data.block import BlockAccessor

from data.ray_loader import RayShardedLoader, ZarrChunkDatasource
from data.shards import ChunkShardPlan
from data.store import FieldDataset, write_field_dataset

REPO = Path(__file__).resolve().parents[1]
N, CHUNK, GRID = 53, 8, (4, 3)  # 7 chunks, the last one partial (5 samples)
EPS = 1e-6


@pytest.fixture(scope="module")
def cluster():
    """A loopback cluster for the module, workers at nice 0 like the clusters the loader starts itself."""
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, object_store_memory=200 * 2**20,
             _system_config={"worker_niceness": 0})
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(N, 2, *GRID)) * np.array([1.0, 10.0])[None, :, None, None] + 3.0).astype(np.float32)
    y = (rng.normal(size=(N, 1, *GRID)) * 0.1 + 7.0).astype(np.float32)
    y[:, 0, 0, 0] = np.arange(N)  # every sample identifiable
    return x, y


def write(url, arrays) -> FieldDataset:
    write_field_dataset(url, *arrays, chunk_size=CHUNK, generator="test", params={"seed": 0},
                        grid_bounds=[[0.0, 1.0], [0.0, 1.0]])
    return FieldDataset(url)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, arrays) -> FieldDataset:
    return write(str(tmp_path_factory.mktemp("ray") / "ds.zarr"), arrays)


def expected(arrays, ds, idx):
    """Numpy reference: samples idx normalised with the stored per-channel statistics."""
    st = ds.normalization()
    mx, sx = (np.asarray(st["inputs"][k])[None, :, None, None] for k in ("mean", "std"))
    my, sy = (np.asarray(st["targets"][k])[None, :, None, None] for k in ("mean", "std"))
    return (arrays[0][idx] - mx) / (sx + EPS), (arrays[1][idx] - my) / (sy + EPS)


def columns(block) -> dict:
    """A read task's block as numpy arrays (tensor columns keep their per-row shape)."""
    return BlockAccessor.for_block(block).to_numpy()


def make_loaders(ds, world, batch_size=4, seed=1, **kw) -> list[RayShardedLoader]:
    group = uuid.uuid4().hex  # rank 0 first: it creates the board the others look up
    return [RayShardedLoader(ds, ChunkShardPlan(N, CHUNK, world, r, seed=seed), batch_size, group=group,
                             chunks_per_block=2, **kw) for r in range(world)]


def consume(loaders, max_batches=None) -> list[list[int]]:
    """One iteration per loader, each rank in its own thread (as separate ranks would); index lists per rank."""
    out, errors = [[] for _ in loaders], []

    def run(r):
        try:
            for b, (_, _, idx) in enumerate(loaders[r].iter_with_index()):
                out[r].extend(idx.tolist())
                if max_batches is not None and b + 1 == max_batches:
                    break
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(loaders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a rank hung"
    if errors:
        raise errors[0]
    return out


# ---- datasource ---------------------------------------------------------------------------


def test_datasource_read_tasks_read_each_chunk_once(dataset, arrays, monkeypatch):
    order = [5, 0, 6, 2, 1, 3, 4]
    src = ZarrChunkDatasource(dataset.url, order, chunks_per_block=3)
    tasks = src.get_read_tasks(parallelism=100)  # the grouping, not parallelism, sets the blocks
    assert src.num_blocks == len(tasks) == 3
    assert [t.metadata.num_rows for t in tasks] == [21, 24, 8]
    reads = []
    real = FieldDataset.read_chunks
    monkeypatch.setattr(FieldDataset, "read_chunks", lambda self, cs: reads.extend(cs) or real(self, cs))
    blocks = [columns(b) for t in tasks for b in t()]  # the read function, run in-process
    assert sorted(reads) == list(range(7))
    index = np.concatenate([b["index"] for b in blocks])
    want = np.concatenate([np.arange(c * CHUNK, min((c + 1) * CHUNK, N)) for c in order])
    np.testing.assert_array_equal(index, want)  # chunk order kept, samples ascending inside a chunk
    x = np.concatenate([b["x"] for b in blocks])
    y = np.concatenate([b["y"] for b in blocks])
    np.testing.assert_array_equal(x, arrays[0][index])
    np.testing.assert_array_equal(y, arrays[1][index])


def test_datasource_selected_rows_and_errors(dataset, arrays):
    src = ZarrChunkDatasource(dataset.url, [2, 0], chunks_per_block=1, indices=[17, 3, 3, 16])
    rows = [(c["index"].tolist(), c["y"][:, 0, 0, 0].tolist())
            for t in src.get_read_tasks(1) for c in map(columns, t())]
    assert rows == [([17, 16], [17.0, 16.0]), ([3, 3], [3.0, 3.0])]  # blocks in chunk order, repeats kept
    with pytest.raises(ValueError, match=r"chunk 7 out of range"):
        ZarrChunkDatasource(dataset.url, [0, 7])
    with pytest.raises(ValueError, match=r"sample 9 lies in chunk 1, which is not among chunk_ids"):
        ZarrChunkDatasource(dataset.url, [0], indices=[9])
    with pytest.raises(ValueError, match="chunks_per_block"):
        ZarrChunkDatasource(dataset.url, [0], chunks_per_block=0)


def test_datasource_through_ray(cluster, dataset, arrays):
    src = ZarrChunkDatasource(dataset.url, range(7), chunks_per_block=4)
    rows = ray.data.read_datasource(src, override_num_blocks=src.num_blocks).take_all()
    assert sorted(r["index"] for r in rows) == list(range(N))
    for r in rows:
        np.testing.assert_array_equal(r["x"], arrays[0][r["index"]])


# ---- loader ---------------------------------------------------------------------------------


def test_one_rank_epochs_cover_the_plan_normalised(cluster, dataset, arrays):
    (loader,) = make_loaders(dataset, 1, batch_size=5, drop_last_batch=False)
    try:
        assert len(loader) == 11
        seen = []
        for epoch in range(2):
            batches = list(loader.iter_with_index())
            assert [len(i) for _, _, i in batches] == [5] * 10 + [3]
            idx = np.concatenate([i for _, _, i in batches])
            # One rank gets every block in order: the epoch is exactly the plan's stream.
            np.testing.assert_array_equal(idx, loader.plan.global_stream(epoch))
            x, y = (torch.cat([b[k] for b in batches]) for k in (0, 1))
            assert x.dtype == y.dtype == torch.float32
            ex, ey = expected(arrays, dataset, idx)
            np.testing.assert_allclose(x.numpy(), ex, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(y.numpy(), ey, rtol=1e-5, atol=1e-5)
            assert loader.state_dict()["epoch"] == epoch + 1 and loader.state_dict()["cursor"] == 0
            seen.append(idx)
        assert sorted(seen[0]) == sorted(seen[1]) and not np.array_equal(seen[0], seen[1])
        for _ in zip(range(3), loader.iter_with_index()):  # stop mid-epoch 2, then resume
            pass
        state = loader.state_dict()
        assert (state["epoch"], state["cursor"]) == (2, 15)
        loader.plan.set_epoch(5)
        loader.load_state_dict(state)
        rest = np.concatenate([i for _, _, i in loader.iter_with_index()])
        np.testing.assert_array_equal(rest, loader.plan.global_stream(2)[15:])
        xb, yb = next(iter(loader))  # plain iteration: (x, y) like ShardedLoader
        assert xb.shape == (5, 2, *GRID) and yb.shape == (5, 1, *GRID)
        ex, ey = expected(arrays, dataset, np.arange(48, 53))
        (xe, ye), = list(loader.evaluation_batches(48, 53))
        np.testing.assert_allclose(xe.numpy(), ex, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ye.numpy(), ey, rtol=1e-5, atol=1e-5)
    finally:
        loader.close()


def test_two_ranks_equal_disjoint_deterministic_and_resume(cluster, dataset):
    loaders = make_loaders(dataset, 2, drop_last_batch=False)
    try:
        per_epoch = [consume(loaders) for _ in range(2)]
        for epoch, (r0, r1) in enumerate(per_epoch):
            assert len(r0) == len(r1) == 26  # samples_per_rank: 53 // 2
            assert not set(r0) & set(r1)
            stream = loaders[0].plan.global_stream(epoch).tolist()  # 52 of 53 samples (the plan's drop_last)
            assert sorted(r0 + r1) == sorted(stream)
        assert per_epoch[0][0] != per_epoch[1][0]
        for ld in loaders:
            ld.plan.set_epoch(0)
        head = consume(loaders, max_batches=2)
        states = [ld.state_dict() for ld in loaders]
        assert states[0] == states[1] and states[0]["cursor"] == 8
    finally:
        for ld in loaders:
            ld.close()
    resumed = make_loaders(dataset, 2, drop_last_batch=False)  # new board, new coordinator
    try:
        for ld in resumed:
            ld.load_state_dict(states[0])
        tail = consume(resumed)
        # Same (seed, epoch, W, chunks_per_block) gives the same rows per rank in the same order, so the
        # resume is exact: nothing twice, nothing lost.
        assert [h + t for h, t in zip(head, tail)] == per_epoch[0]
        assert resumed[0].state_dict()["epoch"] == 1
    finally:
        for ld in resumed:
            ld.close()


def test_group_emptied_by_the_plans_cut(cluster, tmp_path):
    """17 samples in chunks of 8, 8, 1; W = 2 keeps 16. When the 1-sample chunk comes last it is cut, and its
    read task yields an empty block; the split still gives both ranks 8 rows."""
    rng = np.random.default_rng(1)
    write_field_dataset(str(tmp_path / "s.zarr"), rng.normal(size=(17, 1, 2, 2)), rng.normal(size=(17, 1, 2, 2)),
                        chunk_size=8, generator="test", params={}, grid_bounds=[[0.0, 1.0], [0.0, 1.0]])
    plans = [ChunkShardPlan(17, 8, 2, r, seed=0) for r in range(2)]
    epoch = next(e for e in range(50) if plans[0].chunk_order(e)[-1] == 2)
    group = uuid.uuid4().hex
    loaders = [RayShardedLoader(FieldDataset(str(tmp_path / "s.zarr")), p, 4, group=group, chunks_per_block=1)
               for p in plans]
    try:
        for ld in loaders:
            ld.plan.set_epoch(epoch)
        r0, r1 = consume(loaders)
        assert len(r0) == len(r1) == 8 and sorted(r0 + r1) == list(range(16))
    finally:
        for ld in loaders:
            ld.close()


@pytest.mark.slow
def test_torchrun_ranks_without_address(dataset, tmp_path):
    """Two torchrun-like ranks, separate Ray drivers: with no address rank 0 starts a loopback cluster and hands
    its address over torch.distributed (gloo); rank 1 finds rank 0's splits through the named board."""
    script = f"""
import json, sys
sys.path.insert(0, {str(REPO)!r})
import torch.distributed as dist
from data.ray_loader import RayShardedLoader
from data.shards import ChunkShardPlan
from data.store import FieldDataset
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method={(tmp_path / "pg").as_uri()!r}, rank=rank, world_size=2)
ld = RayShardedLoader(FieldDataset({dataset.url!r}), ChunkShardPlan({N}, {CHUNK}, 2, rank, seed=1), 4,
                      chunks_per_block=2, read_cpus=0.5)
idx = [i.tolist() for _, _, i in ld.iter_with_index()]
dist.barrier()
ld.close()
print(json.dumps(idx))
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**env, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}) for r in range(2)]
    try:
        outs = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    r0, r1 = ([i for batch in json.loads(out.strip().splitlines()[-1]) for i in batch] for out, _ in outs)
    assert len(r0) == len(r1) == 24 and not set(r0) & set(r1)  # 6 batches of 4 each
    assert set(r0) | set(r1) <= set(ChunkShardPlan(N, CHUNK, 2, 0, seed=1).global_stream(0).tolist())


def test_missing_chunk_names_it(cluster, tmp_path, arrays):
    ds = write(str(tmp_path / "ds.zarr"), arrays)
    (tmp_path / "ds.zarr" / "inputs" / "c" / "3" / "0" / "0" / "0").unlink()
    for world in (1, 2):  # through the dataset, and through streaming_split's coordinator to both ranks
        loaders = make_loaders(ds, world)
        try:
            with pytest.raises(ValueError, match=r"chunk 3 of array 'inputs' is missing") as info:
                consume(loaders)
            assert str(tmp_path / "ds.zarr") in str(info.value)
        finally:
            for ld in loaders:
                ld.close()


def test_argument_errors(dataset):
    plan = ChunkShardPlan(N, CHUNK, 1, 0)
    with pytest.raises(ValueError, match="chunks_per_block"):
        RayShardedLoader(dataset, plan, 4, chunks_per_block=0)
    with pytest.raises(ValueError, match="read_cpus"):
        RayShardedLoader(dataset, plan, 4, read_cpus=0)
    with pytest.raises(ValueError, match="chunk_size=4 differs"):
        RayShardedLoader(dataset, ChunkShardPlan(N, 4, 1, 0), 4)
    with pytest.raises(ValueError, match="batch_size=60 exceeds"):
        RayShardedLoader(dataset, plan, 60)
