"""Sampling fanned out per chunk (in-process, Ray tasks, torch.distributed ranks) into a resumable sample store,
with an analytic chunk job: x = MU + SIGMA * z, z ~ N(0, 1) drawn from default_rng((seed, chunk))."""

import collections
import json
import os
import sys
import uuid

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from data.samples import SampleStoreWriter, open_samples
from launch.sample import SamplingFailed, run_sampling
from test_ray_loader import cluster  # noqa: F401  the module-scoped loopback Ray cluster

MU, SIGMA = 1.5, 0.5
ROWS, CHUNK, SHAPE = 22, 5, (2, 3, 4)   # 5 chunks, the last one 2 rows


class GaussianChunkJob:
    """The chunk-job contract with an analytic sampler; `log_dir` records model loads and calls, one line each."""

    def __init__(self, seed=0, log_dir=None, fail_at=(), bad=None, with_truth=False):
        self.sample_shape, self.num_rows, self.chunk_size = SHAPE, ROWS, CHUNK
        self.meta = {"sampler": "gaussian", "mu": MU, "sigma": SIGMA, "seed": seed}
        self.extra_arrays = {"truth": (2,)} if with_truth else {}
        self.seed, self.log_dir, self.fail_at, self.bad, self.with_truth = seed, log_dir, set(fail_at), bad, with_truth
        self._model = None

    def _log(self, name, text):
        if self.log_dir is not None:
            with open(os.path.join(self.log_dir, name), "a") as f:
                f.write(f"{text} {os.getpid()}\n")

    def __call__(self, chunk, start, stop):
        if self._model is None:   # "loads its model lazily", once per instance
            self._log("loads", "load")
            self._model = (MU, SIGMA)
        self._log("calls", chunk)
        if chunk in self.fail_at:
            raise RuntimeError("injected failure")
        mu, sigma = self._model
        x = (mu + sigma * np.random.default_rng((self.seed, chunk)).standard_normal((stop - start, *SHAPE)))
        x = x.astype(np.float32)
        if self.bad == "shape":
            x = x[:, :1]
        elif self.bad == "nan" and chunk == 2:
            x[0, 1, 2, 3] = np.nan
        return {"samples": x, "truth": np.full((stop - start, 2), chunk, np.float32)} if self.with_truth else x


def reference(seed=0):
    job = GaussianChunkJob(seed)
    return np.concatenate([job(c, c * CHUNK, min((c + 1) * CHUNK, ROWS)) for c in range(-(-ROWS // CHUNK))])


def lines(log_dir, name):
    path = os.path.join(log_dir, name)
    return [line.split() for line in open(path)] if os.path.exists(path) else []


def calls_per_chunk(log_dir):
    return collections.Counter(int(chunk) for chunk, _ in lines(log_dir, "calls"))


def assert_complete(url, seed=0):
    ds = open_samples(url)
    x = ds.read()
    assert np.array_equal(x, reference(seed)) and ds.meta["seed"] == seed
    np.testing.assert_allclose(ds.stats["samples"]["mean"], x.mean(dtype=np.float64), rtol=1e-6)
    np.testing.assert_allclose(ds.stats["samples"]["std"], x.std(dtype=np.float64), rtol=1e-6)
    assert abs(ds.stats["samples"]["mean"] - MU) < 4 * SIGMA / np.sqrt(x.size)   # the analytic answer
    return ds


def test_in_process_memory_store_with_an_extra_array():
    url = f"memory://fieldtrain-samples-{uuid.uuid4().hex}/s.zarr"
    summary = run_sampling(GaussianChunkJob(with_truth=True), url, progress=False)
    assert summary == {**summary, "mode": "in-process", "workers": 1, "chunks": 5, "done": 5, "skipped": 0,
                       "rows": ROWS}
    ds = assert_complete(url)
    assert ds.read(name="truth")[:, 0].tolist() == [r // CHUNK for r in range(ROWS)]
    assert run_sampling(GaussianChunkJob(with_truth=True), url, progress=False)["skipped"] == 5   # complete
    with pytest.raises(ValueError, match="memory://.*workers=1"):
        run_sampling(GaussianChunkJob(), url, workers=2, progress=False)


def test_failure_keeps_finished_chunks_and_a_rerun_samples_only_the_rest(tmp_path):
    url, logs = str(tmp_path / "s.zarr"), str(tmp_path)
    with pytest.raises(SamplingFailed, match=r"chunk\(s\) \[3\] failed; 3 of 5 chunks are written") as e:
        run_sampling(GaussianChunkJob(log_dir=logs, fail_at={3}), url, progress=False)
    assert e.value.chunks == [3] and "chunk 3: RuntimeError: injected failure" in str(e.value)
    assert sorted(SampleStoreWriter.attach(url).completed_chunks()) == [0, 1, 2]
    with pytest.raises(ValueError, match=r"unfinished, 3 of 5 chunks done.*rerun the same command"):
        open_samples(url)
    summary = run_sampling(GaussianChunkJob(log_dir=logs), url, progress=False)
    assert (summary["done"], summary["skipped"], summary["rows"]) == (2, 3, 7)
    assert calls_per_chunk(logs) == {0: 1, 1: 1, 2: 1, 3: 2, 4: 1}   # finished chunks not recomputed
    assert_complete(url)
    assert not os.path.exists(tmp_path / "s.zarr" / "progress")       # markers removed once sealed


def test_other_meta_is_refused_naming_the_keys(tmp_path):
    url = str(tmp_path / "s.zarr")
    with pytest.raises(SamplingFailed):
        run_sampling(GaussianChunkJob(fail_at={1}), url, progress=False)
    with pytest.raises(ValueError, match=r"unfinished store there differs in \['meta.seed'\].*overwrite"):
        run_sampling(GaussianChunkJob(seed=1), url, progress=False)
    run_sampling(GaussianChunkJob(), url, progress=False)
    with pytest.raises(ValueError, match=r"complete store there differs in \['meta.seed'\]"):
        run_sampling(GaussianChunkJob(seed=1), url, progress=False)
    run_sampling(GaussianChunkJob(seed=1), url, progress=False, overwrite=True)
    assert_complete(url, seed=1)


@pytest.mark.parametrize("bad, chunk, message", [("shape", 0, r"has shape \(5, 1, 3, 4\); expected \(5, 2, 3, 4\)"),
                                                 ("nan", 2, "contains 1 non-finite value")])
def test_a_bad_chunk_is_refused_and_named(tmp_path, bad, chunk, message):
    url = str(tmp_path / "s.zarr")
    with pytest.raises(SamplingFailed, match=f"chunk {chunk} .*{message}") as e:
        run_sampling(GaussianChunkJob(bad=bad), url, progress=False)
    assert e.value.chunks == [chunk] and url in str(e.value)
    assert sorted(SampleStoreWriter.attach(url).completed_chunks()) == list(range(chunk))
    writer = SampleStoreWriter.attach(url)
    with pytest.raises(ValueError, match=r"chunk 4 brings arrays \['samples', 'truth'\]"):
        writer.write_chunk(4, {"samples": np.zeros((2, *SHAPE)), "truth": np.zeros((2, 2))})
    with pytest.raises(ValueError, match=f"{url}: chunk 4 .*has dtype complex"):
        writer.write_chunk(4, np.zeros((2, *SHAPE), np.complex64))


@pytest.fixture(scope="module")
def ray_cluster(cluster):
    """test_ray_loader's loopback cluster; this module's job class travels by value (Ray workers cannot import it)."""
    import ray
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow
def test_ray_tasks_write_the_same_store_and_load_the_model_once_per_worker(tmp_path, ray_cluster):
    url, logs = f"file://{tmp_path}/s.zarr", [str(tmp_path / "run1"), str(tmp_path / "run2")]
    for d in logs:
        os.mkdir(d)
    with pytest.raises(SamplingFailed, match=r"(?s)chunk\(s\) \[1\] failed.*chunk 1: RuntimeError: injected failure"):
        run_sampling(GaussianChunkJob(log_dir=logs[0], fail_at={1}), url, workers=2, progress=False)
    first = calls_per_chunk(logs[0])   # chunk 1, and those handed out before its failure came back
    assert sorted(SampleStoreWriter.attach(url).completed_chunks()) == sorted(set(first) - {1})
    summary = run_sampling(GaussianChunkJob(log_dir=logs[1]), url, workers=2, task_cpus=0.5, progress=False)
    assert summary == {**summary, "mode": "ray", "workers": 2, "done": 6 - len(first), "skipped": len(first) - 1}
    assert first + calls_per_chunk(logs[1]) == {c: 1 + (c == 1) for c in range(5)}   # none sampled twice
    loads = [pid for _, pid in lines(logs[1], "loads")]
    assert len(loads) == len(set(loads))   # one model load per Ray worker process, however many chunks it ran
    assert_complete(url)


def _rank_main(rank, world, port, url, log_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = {}
        try:
            run_sampling(GaussianChunkJob(log_dir=log_dir, fail_at={3}), url, progress=False)
        except SamplingFailed as e:
            out["failed"] = [e.chunks, str(e)]
        out["summary"] = run_sampling(GaussianChunkJob(log_dir=log_dir), url, progress=rank == 0)
        with open(os.path.join(log_dir, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        from launch.rendezvous import destroy_distributed
        destroy_distributed()


@pytest.mark.slow
def test_torch_distributed_ranks_share_the_chunks_and_resume(tmp_path):
    from launch.local import free_port
    url, logs = str(tmp_path / "s.zarr"), str(tmp_path)
    mp.start_processes(_rank_main, args=(2, free_port(), url, logs), nprocs=2, start_method="spawn")
    outs = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    for out in outs:   # rank 1 failed at chunk 3 (its share: 1, 3); both ranks say so
        assert out["failed"][0] == [3] and "on rank 1: RuntimeError: injected failure" in out["failed"][1]
        assert out["summary"] == {**out["summary"], "mode": "torch.distributed", "workers": 2, "done": 1,
                                  "skipped": 4, "rows": 5}
    assert calls_per_chunk(logs) == {0: 1, 1: 1, 2: 1, 3: 2, 4: 1}
    by_rank = collections.defaultdict(set)
    for chunk, pid in lines(logs, "calls"):
        by_rank[pid].add(int(chunk))
    assert sorted(map(sorted, by_rank.values())) == [[0, 2, 3, 4], [1, 3]]   # rank r: remaining chunks r, r + W, ...
    assert_complete(url)
