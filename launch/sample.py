"""Sampling fanned out per chunk into a resumable sample store (data.samples), whatever the model.

    summary = run_sampling(job, "s3://bucket/samples.zarr", workers=4, storage_options={...})

A *chunk job* is a picklable object with `sample_shape` (one row), `num_rows`, `chunk_size`, `meta` (a
JSON-serialisable description stored in the group; a rerun with other meta is refused), optionally
`extra_arrays` ({name: row shape} written alongside "samples"), and `job(chunk, start, stop)` returning
float32 (stop - start, *sample_shape), or a dict with every array. It seeds itself from (its seed, chunk), so
the store does not depend on where or in which order chunks ran, and loads its model on first call.

Where chunks run:
* in this process: workers == 1 (and always for memory:// stores, which live in one process);
* as Ray tasks, at most `workers` at once (workers > 1); the job travels once through Ray's object store
  and each Ray worker process unpickles it once, so its model loads once per worker, not once per chunk;
* on the ranks of an initialised torch.distributed group of W > 1 (torchrun, mpirun, srun): rank r takes
  the remaining chunks r, r + W, ...; rank 0 creates the store and seals it. The store must be reachable
  from every rank (a shared file system or an object store).

Chunks are written whole, each before its completion marker. A failure stops handing out chunks, lets those
already running finish, and raises SamplingFailed naming the failed chunks; every written chunk stays, so
rerunning the same command samples only the rest.
"""

from __future__ import annotations

import os
import time
import traceback

import torch.distributed as dist

from data.samples import SampleStoreWriter

_job_cache: dict = {}   # in a Ray worker process: {object ref id: job}, the last job only


class SamplingFailed(RuntimeError):
    """Some chunks failed; `chunks` lists them. Every chunk written before stays: rerun to finish the rest."""

    def __init__(self, message: str, chunks: list[int] = ()):
        super().__init__(message)
        self.chunks = sorted(chunks)


def _failure(url: str, failed: dict[int, str], writer: SampleStoreWriter) -> SamplingFailed:
    done = writer.num_completed()
    lines = [f"{url}: sampling chunk(s) {sorted(failed)} failed; {done} of {writer.num_chunks} chunks are written and "
             f"kept: rerun the same command to sample the other {writer.num_chunks - done}"]
    lines += [f"  chunk {c}: {failed[c]}" for c in sorted(failed)]
    return SamplingFailed("\n".join(lines), list(failed))


def _sample_chunk(job, writer: SampleStoreWriter, chunk: int) -> int:
    start, stop = writer.rows(chunk)
    writer.write_chunk(chunk, job(chunk, start, stop))
    return stop - start


def _remote_chunk(job_box: list, url: str, storage_options: dict | None, chunk: int) -> tuple[int, str | None]:
    """A Ray task: (rows written, None) or (0, the error with its traceback); errors come back as values so the
    driver can name the chunk and drain the other tasks."""
    import ray
    ref = job_box[0]   # boxed, so Ray hands over the reference and this worker fetches the job only once
    if ref.hex() not in _job_cache:
        _job_cache.clear()
        _job_cache[ref.hex()] = ray.get(ref)
    try:
        return _sample_chunk(_job_cache[ref.hex()], SampleStoreWriter.attach(url, storage_options), chunk), None
    except Exception as e:
        return 0, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"


def _progress_bar(enabled: bool, writer: SampleStoreWriter, url: str, skipped: int):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=writer.num_chunks, initial=skipped, desc=f"sample -> {url}", unit="chunk")


def _in_process(job, writer: SampleStoreWriter, todo: list[int], bar) -> int:
    rows = 0
    for c in todo:
        try:
            rows += _sample_chunk(job, writer, c)
        except Exception as e:
            raise _failure(writer.url, {c: f"{type(e).__name__}: {e}"}, writer) from e
        if bar is not None:
            bar.update(1)
    return rows


def _ray_tasks(job, writer: SampleStoreWriter, todo: list[int], bar, workers: int, storage_options: dict | None,
               ray_address: str | None, task_cpus: float) -> int:
    import ray

    from data.ray_loader import _connect
    started = _connect(ray_address, 0, 1)   # an initialised Ray as is, else ray_address / RAY_ADDRESS, else loopback
    try:
        try:
            job_box = [ray.put(job)]
        except Exception as e:
            raise ValueError(f"{writer.url}: the chunk job must be picklable to run as Ray tasks "
                             f"({type(e).__name__}: {e}); use workers=1") from e
        task = ray.remote(_remote_chunk).options(num_cpus=task_cpus, max_retries=2)
        queue, running, failed, rows = list(todo), {}, {}, 0
        while running or (queue and not failed):
            while queue and not failed and len(running) < workers:   # at most `workers` chunks in flight
                c = queue.pop(0)
                running[task.remote(job_box, writer.url, storage_options, c)] = c
            [ready], _ = ray.wait(list(running), num_returns=1)
            c = running.pop(ready)
            try:
                n, error = ray.get(ready)
            except ray.exceptions.RayError as e:   # the worker died (out of memory, killed): chunk not written
                n, error = 0, f"{type(e).__name__}: {e}"
            if error is not None:
                failed[c] = error
                continue
            rows += n
            if bar is not None:
                bar.update(1)
        if failed:
            raise _failure(writer.url, failed, writer)
        return rows
    finally:
        if started:
            ray.shutdown()


def _ranks(job, url: str, storage_options: dict | None, codec: str, overwrite: bool, progress: bool):
    """Every rank of the torch.distributed group samples chunks rank, rank + W, ... of those left."""
    rank, world = dist.get_rank(), dist.get_world_size()
    box: list = [None]
    writer = None
    if rank == 0:
        try:
            writer = _open_writer(job, url, storage_options, codec, overwrite)
            box[0] = sorted(set(range(writer.num_chunks)) - set(writer.completed_chunks()))
        finally:   # broadcast even on failure, so the other ranks raise instead of waiting
            dist.broadcast_object_list(box, src=0)
    else:
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            raise ValueError(f"{url}: rank 0 could not create or resume the sample store (its error says why)")
    todo, mine = box[0], box[0][rank::world]
    failed, rows = {}, 0
    bar = _progress_bar(progress, writer, url, writer.num_chunks - len(todo)) if rank == 0 else None
    for c in mine:
        try:
            writer = writer or SampleStoreWriter.attach(url, storage_options)   # every rank must reach the store
            rows += _sample_chunk(job, writer, c)
        except Exception as e:
            failed[c] = f"on rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"
            break
        if bar is not None:   # all ranks' chunks, as their markers show
            bar.update(writer.num_completed() - bar.n)
    if bar is not None:
        bar.close()
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (failed, rows))
    failed = {c: e for f, _ in gathered for c, e in f.items()}
    outcome: list = [None]   # rank 0's word: the failure message, or True once the store is sealed
    if rank == 0:
        try:
            if failed:
                outcome[0] = str(_failure(url, failed, writer))
            else:
                writer.finish()
                outcome[0] = True
        finally:
            dist.broadcast_object_list(outcome, src=0)
    else:
        dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], str):
        raise SamplingFailed(outcome[0], list(failed))
    if outcome[0] is None:
        raise ValueError(f"{url}: rank 0 could not finish the sample store (its error says why)")
    return writer or SampleStoreWriter.attach(url, storage_options), todo, sum(n for _, n in gathered)


def _open_writer(job, url: str, storage_options: dict | None, codec: str, overwrite: bool) -> SampleStoreWriter:
    return SampleStoreWriter(url, job.num_rows, job.sample_shape, job.chunk_size, job.meta,
                             storage_options=storage_options, codec=codec, overwrite=overwrite, resume=True,
                             extra_arrays=getattr(job, "extra_arrays", None))


def run_sampling(job, url: str, *, workers: int = 1, storage_options: dict | None = None,
                 ray_address: str | None = None, task_cpus: float = 0.5, progress: bool = True,
                 overwrite: bool = False, codec: str = "blosc-lz4") -> dict:
    """Sample every chunk of `job` not yet in the store at `url`, then seal the store (module docstring).

    Returns {"url", "mode", "workers", "chunks", "done", "skipped", "rows", "seconds", "samples_per_s"}: "done"
    chunks (holding "rows" rows) were sampled by this call, "skipped" were already written. Under
    torch.distributed every rank returns the same summary, once the store is sealed.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1 (1: in this process, N: up to N Ray tasks at once), "
                         f"got {workers!r}")
    if not callable(job):
        raise ValueError(f"the chunk job must be callable as job(chunk, start, stop); got {type(job).__name__}")
    if "://" not in url:
        url = os.path.abspath(url)   # Ray workers and other ranks need not share this process's directory
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if url.startswith("memory://") and (workers > 1 or world > 1):
        raise ValueError(f"{url}: a memory:// store lives in one process, which Ray tasks and other ranks cannot "
                         f"reach; use a file path or an object store, or workers=1 in one process")
    if world > 1 and workers != 1:
        raise ValueError(f"under torch.distributed each of the {world} ranks samples its own chunks; Ray workers "
                         f"({workers}) on top are not supported: use workers=1")
    t0 = time.perf_counter()
    if world > 1:
        writer, todo, rows = _ranks(job, url, storage_options, codec, overwrite, progress)
        mode, workers = "torch.distributed", world
    else:
        writer = _open_writer(job, url, storage_options, codec, overwrite)
        done = writer.completed_chunks()
        todo = [c for c in range(writer.num_chunks) if c not in done]
        bar = _progress_bar(progress, writer, url, len(done))
        try:
            if workers == 1 or not todo:
                mode, workers, rows = "in-process", 1, _in_process(job, writer, todo, bar)
            else:
                mode = "ray"
                rows = _ray_tasks(job, writer, todo, bar, workers, storage_options, ray_address, task_cpus)
        finally:
            if bar is not None:
                bar.close()
        writer.finish()
    seconds = time.perf_counter() - t0
    return {"url": url, "mode": mode, "workers": workers, "chunks": writer.num_chunks, "done": len(todo),
            "skipped": writer.num_chunks - len(todo), "rows": rows, "seconds": seconds,
            "samples_per_s": rows / seconds if seconds > 0 else 0.0}
