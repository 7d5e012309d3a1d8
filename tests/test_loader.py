"""ShardedLoader / evaluation_batches on real Zarr stores (local directory and memory://)."""

import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from data.loader import ChannelNormalizer, ShardedLoader, evaluation_batches
from data.shards import ChunkShardPlan
from data.store import FieldDataset, write_field_dataset

N, CHUNK, GRID = 53, 8, (4, 3)  # 7 chunks, the last one partial (5 samples)
EPS = 1e-6


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    scale = np.array([1.0, 10.0])[None, :, None, None]
    x = (rng.normal(size=(N, 2, *GRID)) * scale + np.array([3.0, -5.0])[None, :, None, None]).astype(np.float32)
    y = (rng.normal(size=(N, 1, *GRID)) * 0.1 + 7.0).astype(np.float32)
    # Make every sample identifiable: channel 0 of the target at grid point (0, 0) holds its index.
    y[:, 0, 0, 0] = np.arange(N)
    return x, y


def write(url, arrays):
    x, y = arrays
    write_field_dataset(url, x, y, chunk_size=CHUNK, generator="test", params={"seed": 0},
                        grid_bounds=[[0.0, 1.0], [0.0, 1.0]])
    return FieldDataset(url)


@pytest.fixture(params=["local", "memory"])
def dataset(request, tmp_path, arrays):
    url = str(tmp_path / "ds.zarr") if request.param == "local" else f"memory://loader-{uuid.uuid4().hex}/ds.zarr"
    return write(url, arrays)


@pytest.fixture
def local_dataset(tmp_path, arrays):
    return write(str(tmp_path / "ds.zarr"), arrays)


def expected(arrays, ds, idx):
    """Numpy reference: samples idx normalised with the stored per-channel statistics."""
    x, y = arrays
    st = ds.normalization()
    mx, sx = (np.asarray(st["inputs"][k])[None, :, None, None] for k in ("mean", "std"))
    my, sy = (np.asarray(st["targets"][k])[None, :, None, None] for k in ("mean", "std"))
    return (x[idx] - mx) / (sx + EPS), (y[idx] - my) / (sy + EPS)


def loader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("fieldtrain-loader") and t.is_alive()]


def sample_ids(ds, y):
    """Recover global sample indices from normalised targets (see the `arrays` fixture)."""
    st = ds.normalization()["targets"]
    return np.rint(y[:, 0, 0, 0].double().numpy() * (st["std"][0] + EPS) + st["mean"][0]).astype(np.int64)


def collect(loader, n_batches):
    """Pull n_batches from the loader across epoch boundaries, like a trainer's epoch loop."""
    out = []
    while len(out) < n_batches:
        for batch in loader:
            out.append(batch)
            if len(out) == n_batches:
                break
    return out


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("drop_last_batch", [True, False])
def test_batches_follow_the_plan_normalised_with_stored_stats(dataset, arrays, world, drop_last_batch):
    batch = 5
    for rank in range(world):
        plan = ChunkShardPlan(N, CHUNK, world, rank, seed=3, window_chunks=2)
        loader = ShardedLoader(dataset, plan, batch_size=batch, prefetch=2, drop_last_batch=drop_last_batch)
        idx = plan.epoch_indices(0)
        batches = list(loader)
        assert len(batches) == len(loader)
        sizes = [len(x) for x, _ in batches]
        assert sizes[:-1] == [batch] * (len(sizes) - 1)
        used = sum(sizes)
        assert used == (len(idx) // batch * batch if drop_last_batch else len(idx))
        xs = torch.cat([x for x, _ in batches]).numpy()
        ys = torch.cat([y for _, y in batches]).numpy()
        assert xs.dtype == ys.dtype == np.float32
        ex, ey = expected(arrays, dataset, idx[:used])
        np.testing.assert_allclose(xs, ex, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ys, ey, rtol=1e-5, atol=1e-5)
        assert (plan.epoch, plan.cursor) == (1, 0)  # the dropped partial batch does not linger
        # Next epoch continues with the next permutation.
        second = torch.cat([y for _, y in loader])
        np.testing.assert_array_equal(sample_ids(dataset, second), plan.epoch_indices(1)[: len(second)])


def test_full_pass_is_standardised(local_dataset):
    """Analytic check of the stored stats: over all samples each channel has mean 0 and std 1."""
    plan = ChunkShardPlan(N, CHUNK, 1, 0, seed=1)
    xs, ys = zip(*ShardedLoader(local_dataset, plan, batch_size=N, drop_last_batch=False))
    for t in (torch.cat(xs).double(), torch.cat(ys).double()):
        per_channel = t.transpose(0, 1).reshape(t.shape[1], -1)
        np.testing.assert_allclose(per_channel.mean(1).numpy(), 0.0, atol=1e-5)
        np.testing.assert_allclose(per_channel.std(1, correction=0).numpy(), 1.0, atol=1e-4)


@pytest.mark.parametrize("drop_last_batch", [True, False])
@pytest.mark.parametrize("stop_after", [0, 1, 3, 5, 6, 8])
def test_resume_from_state_dict_gives_the_uninterrupted_batches(dataset, drop_last_batch, stop_after):
    world, rank, batch = 2, 1, 4  # 26 samples per rank: 6 full batches + 2 (dropped or not)

    def make():
        plan = ChunkShardPlan(N, CHUNK, world, rank, seed=5, window_chunks=1)
        return ShardedLoader(dataset, plan, batch_size=batch, prefetch=3, drop_last_batch=drop_last_batch)

    per_epoch = len(make())
    total = 2 * per_epoch + 2  # into the third epoch
    reference = collect(make(), total)
    first = make()
    collect(first, stop_after)
    state = first.state_dict()
    first.close()
    resumed = make()
    resumed.load_state_dict(state)
    rest = collect(resumed, total - stop_after)
    assert len(rest) == len(reference[stop_after:])
    for (x0, y0), (x1, y1) in zip(reference[stop_after:], rest):
        torch.testing.assert_close(x1, x0, rtol=0, atol=0)
        torch.testing.assert_close(y1, y0, rtol=0, atol=0)


def test_cursor_mid_batch_yields_the_rest_of_that_batch_first(local_dataset, arrays):
    plan = ChunkShardPlan(N, CHUNK, 1, 0, seed=8)
    plan.advance(3)  # e.g. after a world-size change; boundaries stay at multiples of 4
    loader = ShardedLoader(local_dataset, plan, batch_size=4, drop_last_batch=False)
    batches = list(loader)
    assert [len(x) for x, _ in batches] == [1] + [4] * 12 + [1]
    x = torch.cat([b[0] for b in batches])
    idx = ChunkShardPlan(N, CHUNK, 1, 0, seed=8).epoch_indices(0)[3:]
    # The loader's numpy normalisation agrees with ChannelNormalizer: decode recovers the raw samples.
    torch.testing.assert_close(loader.input_normalizer.decode(x), torch.from_numpy(arrays[0][idx]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window_chunks", [1, 2])
def test_each_chunk_read_at_most_once_per_epoch(local_dataset, window_chunks):
    world = 2
    for rank in range(world):
        plan = ChunkShardPlan(N, CHUNK, world, rank, seed=2, window_chunks=window_chunks)
        reads: list[int] = []
        original = local_dataset.read_chunks

        def counting(chunks, _orig=original):
            reads.extend(chunks)
            return _orig(chunks)

        local_dataset.read_chunks = counting
        try:
            for epoch in range(2):
                reads.clear()
                n = sum(len(x) for x, _ in ShardedLoader(local_dataset, plan, batch_size=3, prefetch=1))
                assert n > 0
                assert len(reads) == len(set(reads))
                # Exactly the chunks of the samples used (the dropped partial batch is never read).
                assert set(reads) == set((plan.epoch_indices(epoch)[:n] // CHUNK).tolist())
        finally:
            del local_dataset.read_chunks


def test_reader_error_surfaces_in_consumer_naming_the_chunk(local_dataset):
    chunk = 4
    files = list(Path(local_dataset.url, "inputs", "c", str(chunk)).rglob("*"))
    victims = [f for f in files if f.is_file()]
    assert victims, "chunk file layout changed"
    for f in victims:
        f.unlink()
    plan = ChunkShardPlan(N, CHUNK, 1, 0, shuffle=False)
    loader = ShardedLoader(local_dataset, plan, batch_size=4, prefetch=1)
    got = 0
    with pytest.raises(ValueError, match=rf"chunk {chunk}\b.*missing") as info:
        for x, _ in loader:
            got += len(x)
    assert local_dataset.url in str(info.value)
    assert got <= chunk * CHUNK  # samples of earlier chunks came through first
    assert plan.cursor == got
    assert not loader_threads()


def test_close_and_break_stop_the_thread(dataset):
    plan = ChunkShardPlan(N, CHUNK, 1, 0, seed=0)
    loader = ShardedLoader(dataset, plan, batch_size=2, prefetch=2)
    it = iter(loader)
    next(it)
    next(it)
    assert loader_threads()
    loader.close()
    assert not loader_threads()
    assert plan.cursor == 4
    for _ in loader:  # break out early: the generator's cleanup stops the thread
        break
    assert not loader_threads()
    assert plan.cursor == 6


@pytest.mark.parametrize("start,stop,batch", [(0, N, 8), (16, N, 5), (3, 20, 64)])
def test_evaluation_batches_cover_the_range_in_order(dataset, arrays, start, stop, batch):
    batches = list(evaluation_batches(dataset, start, stop, batch_size=batch))
    assert [len(x) for x, _ in batches][:-1] == [batch] * (len(batches) - 1)
    xs = torch.cat([x for x, _ in batches]).numpy()
    ys = torch.cat([y for _, y in batches]).numpy()
    ex, ey = expected(arrays, dataset, np.arange(start, stop))
    np.testing.assert_allclose(xs, ex, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ys, ey, rtol=1e-5, atol=1e-5)
    raw = torch.cat([y for _, y in evaluation_batches(dataset, start, stop, batch, normalize=False)])
    np.testing.assert_array_equal(raw.numpy(), arrays[1][start:stop])


def test_channel_normalizer_round_trip_and_errors():
    norm = ChannelNormalizer([1.0, -2.0, 0.5], [2.0, 0.0, 4.0])
    x = torch.randn(5, 3, 6, 7, dtype=torch.float64)
    enc = norm.encode(x)
    ref = (x - torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1)) / (torch.tensor([2.0, 0.0, 4.0]).view(1, 3, 1, 1) + 1e-6)
    torch.testing.assert_close(enc, ref.to(torch.float64))
    torch.testing.assert_close(norm.decode(enc), x)
    assert set(norm.state_dict()) == {"mean", "std"}
    with pytest.raises(ValueError, match=r"expected \(batch, 3, \*grid\)"):
        norm.encode(torch.zeros(2, 4, 8))
    with pytest.raises(ValueError, match="equal-length"):
        ChannelNormalizer.from_stats({"mean": [0.0, 1.0], "std": [1.0]})
    with pytest.raises(ValueError, match="std >= 0"):
        ChannelNormalizer([0.0], [-1.0])


def test_loader_rejects_mismatched_plan(local_dataset):
    with pytest.raises(ValueError, match="chunk_size=4 differs"):
        ShardedLoader(local_dataset, ChunkShardPlan(N, 4, 1, 0), batch_size=2)
    with pytest.raises(ValueError, match="holds 53"):
        ShardedLoader(local_dataset, ChunkShardPlan(N, CHUNK, 1, 0, start=8), batch_size=2)
    with pytest.raises(ValueError, match="exceeds samples_per_rank=13"):
        ShardedLoader(local_dataset, ChunkShardPlan(N, CHUNK, 4, 0), batch_size=14)
