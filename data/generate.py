"""Dataset generation fanned out over Ray: one task per chunk, resumable.

    generate_dataset("darcy", "s3://bucket/darcy.zarr", n=10_000, res=64, chunk_size=64,
                     storage_options={...}, ray_address="auto")

The driver creates the group and its arrays; each Ray task generates one chunk
(`<module>.chunk_arrays(chunk, count, res, seed, **params)`, seeded by (seed, chunk)), writes it, and then
writes the chunk's completion marker with its per-channel statistics. No two tasks write the same chunk.
Rerunning the same command skips chunks whose marker exists, so an interrupted generation resumes; the
driver finally combines the markers' statistics into the normalisation attributes (no second read).

`workers` chooses where chunks are made: 1 in this process without Ray, N > 1 as Ray tasks with at most N
running at once, None (default) as Ray tasks limited only by the cluster's CPUs (`task_cpus` each).
`memory://` stores live inside one process, so they are generated in-process, without Ray.
"""

from __future__ import annotations

import importlib
import json
import logging
import shlex
import time
import tomllib

from data.store import FieldDataset, FieldDatasetWriter

log = logging.getLogger("fieldtrain.data")
GENERATORS = {"darcy": "data.darcy", "burgers": "data.burgers", "navier_stokes": "data.navier_stokes"}


def generator_module(problem: str):
    if problem not in GENERATORS:
        raise ValueError(f"unknown generator {problem!r}; allowed: {', '.join(GENERATORS)}")
    return importlib.import_module(GENERATORS[problem])


def _param_text(value) -> str:
    """A --param value that the CLI's TOML parsing turns back into `value` exactly."""
    if isinstance(value, str):
        try:
            tomllib.loads(f"v = {value}")
        except tomllib.TOMLDecodeError:
            return value                      # the CLI keeps unparsable text as a string
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, (list, dict)) else repr(value)


def generate_command(url: str, attrs: dict, codec: str = "blosc-lz4", overwrite: bool = False,
                     storage_options: dict | None = None) -> str:
    """The `fieldtrain data generate` command line that wrote (and so resumes) a store, from its group
    attributes "generator" and "params": only parameters that differ from the generator's defaults are given,
    and the command is checked to reproduce "params" exactly (otherwise resuming would refuse).

    Raises ValueError (or KeyError) when the attributes do not come from `generate_dataset`."""
    problem, params = attrs["generator"], dict(attrs["params"])
    module = generator_module(problem)
    core = {k: params.pop(k) for k in ("n", "res", "seed", "chunk_size")}
    defaults = module.describe(core["res"])["params"]
    given = {k: params[k] for k in module.DEFAULTS if k in params and params[k] != defaults.get(k)}
    if json.loads(json.dumps(module.describe(core["res"], **given)["params"])) != params:
        raise ValueError(f"{url}: params {attrs['params']} are not what {problem} would store for {given}")
    argv = ["fieldtrain", "data", "generate", problem, "--n", str(core["n"]), "--res", str(core["res"]),
            "--out", url, "--seed", str(core["seed"]), "--chunk-size", str(core["chunk_size"])]
    for k, v in given.items():
        argv += ["--param", f"{k}={_param_text(v)}"]
    argv += ["--codec", codec] if codec != "blosc-lz4" else []
    argv += ["--overwrite"] if overwrite else []
    command = shlex.join(argv)
    # Storage options may hold credentials: name the flag, never the values.
    return command + " --storage-options '<the same JSON>'" if storage_options else command


def _write_chunk(problem: str, url: str, storage_options: dict | None, chunk: int, count: int, res: int,
                 seed: int, params: dict) -> int:
    try:
        inputs, targets = generator_module(problem).chunk_arrays(chunk, count, res, seed, **params)
        FieldDatasetWriter.attach(url, storage_options).write_chunk(chunk, inputs, targets)
    except Exception as e:
        raise RuntimeError(f"{url}: generating chunk {chunk} of {problem} failed: {type(e).__name__}: {e}") from e
    return chunk


def generate_dataset(problem: str, url: str, n: int, res: int, seed: int = 0, chunk_size: int = 64,
                     params: dict | None = None, storage_options: dict | None = None, codec: str = "blosc-lz4",
                     overwrite: bool = False, ray_address: str | None = None, task_cpus: float = 0.5,
                     progress: bool = True, max_chunks: int | None = None, workers: int | None = None) -> dict:
    """Generate (or finish generating) `n` samples of `problem` at resolution `res` into `url`.

    `max_chunks` stops after writing that many chunks (an interrupted run, for tests and staged jobs).
    `workers`: 1 generates in this process; N > 1 runs Ray tasks, at most N at once; None (default) runs Ray
    tasks as the cluster's CPUs allow, except for memory:// stores, which are generated in this process.
    Returns {"chunks": total, "written": this call, "skipped": already complete, "seconds": wall time}.
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be an integer >= 1 (1: in this process, N: up to N Ray tasks at once), "
                         f"got {workers!r}")
    if url.startswith("memory://") and workers not in (None, 1):
        raise ValueError(f"{url}: a memory:// store lives in this process and Ray tasks cannot reach it; "
                         f"use workers=1 (--workers 1), not {workers}")
    module = generator_module(problem)
    desc = module.describe(res, **(params or {}))
    full_params = {**desc["params"], "n": n, "res": res, "seed": seed, "chunk_size": chunk_size}
    try:
        existing = FieldDataset(url, storage_options)
    except ValueError:
        existing = None
    if existing is not None and not overwrite:
        if existing.attrs["generator"] == problem and existing.attrs["params"] == full_params:
            log.info("%s is already complete", url)
            return {"chunks": existing.num_chunks, "written": 0, "skipped": existing.num_chunks, "seconds": 0.0}
        raise ValueError(f"{url} already holds a complete {existing.attrs['generator']} dataset with params "
                         f"{existing.attrs['params']}; pass overwrite=True (--overwrite) to replace it")
    writer = FieldDatasetWriter(url, n, desc["input_shape"], desc["target_shape"], chunk_size, problem, full_params,
                                desc["grid_bounds"], storage_options=storage_options, codec=codec,
                                overwrite=overwrite, resume=not overwrite)
    done = set(writer.completed_chunks())
    todo = [c for c in range(writer.num_chunks) if c not in done]
    if max_chunks is not None:
        todo = todo[:max_chunks]
    counts = {c: min(chunk_size, n - c * chunk_size) for c in todo}
    gen_params = desc["params"]
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=writer.num_chunks, initial=len(done), desc=f"{problem} -> {url}", unit="chunk")
    if workers == 1 or url.startswith("memory://") or not todo:
        for c in todo:
            _write_chunk(problem, url, storage_options, c, counts[c], res, seed, gen_params)
            if bar is not None:
                bar.update(1)
    else:
        _fan_out(problem, url, storage_options, todo, counts, res, seed, gen_params, ray_address, task_cpus, bar,
                 max_running=workers or len(todo))
    if bar is not None:
        bar.close()
    if len(done) + len(todo) == writer.num_chunks:
        writer.finish()
    return {"chunks": writer.num_chunks, "written": len(todo), "skipped": len(done),
            "seconds": time.perf_counter() - t0}


def _fan_out(problem, url, storage_options, todo, counts, res, seed, params, ray_address, task_cpus, bar,
             max_running: int) -> None:
    import ray
    started = not ray.is_initialized()
    if started:
        if ray_address:
            ray.init(address=ray_address, logging_level=logging.WARNING)
        else:
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, logging_level=logging.WARNING)
    try:
        task = ray.remote(_write_chunk).options(num_cpus=task_cpus, max_retries=2)
        queue, pending = list(todo), []
        while queue or pending:
            while queue and len(pending) < max_running:   # at most max_running tasks submitted at once
                c = queue.pop(0)
                pending.append(task.remote(problem, url, storage_options, c, counts[c], res, seed, params))
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)   # re-raises a task's error, naming the chunk it was writing
            if bar is not None:
                bar.update(len(ready))
    finally:
        if started:
            ray.shutdown()
