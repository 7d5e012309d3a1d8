"""Zarr v3 storage for field datasets: one group per dataset, opened from any fsspec URL.

Layout of a dataset group::

    <url>/zarr.json             group attributes (see REQUIRED_ATTRS)
    <url>/inputs                float32 (N, C_in, *grid),  chunks (chunk_size, C_in, *grid)
    <url>/targets               float32 (N, C_out, *grid), chunks (chunk_size, C_out, *grid)

Chunking is along the sample axis N only, so a chunk is the unit of I/O for the loader
and chunk i lives under the key ``<array>/c/<i>/0/0...``.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

FORMAT_VERSION = 1
ARRAY_NAMES = ("inputs", "targets")
REQUIRED_ATTRS = ("fieldtrain_version", "generator", "params", "grid", "num_samples", "normalization")
CODECS = ("blosc-lz4", "zstd", "none")
PROGRESS_PREFIX = "progress"   # <url>/progress/<chunk>.json: a written chunk's marker and statistics


def open_zarr_store(url: str, storage_options: dict | None = None, read_only: bool = True) -> zarr.abc.store.Store:
    """Open a store for a plain path (LocalStore) or any fsspec URL such as file://, memory://, s3://."""
    if "://" not in url:
        return LocalStore(url, read_only=read_only)
    options = dict(storage_options or {})
    if url.startswith("file://") and not read_only:
        # fsspec's local filesystem does not create parent directories on write by itself.
        options.setdefault("auto_mkdir", True)
    return FsspecStore.from_url(url, storage_options=options, read_only=read_only)


def store_is_empty(url: str, storage_options: dict | None = None, store=None) -> bool:
    """True when nothing is stored at `url` yet (a missing directory counts as empty)."""
    store = store or open_zarr_store(url, storage_options, read_only=False)
    try:
        return sync(store.is_empty(""))
    except FileNotFoundError:
        return True


def _compressors(codec: str):
    if codec == "blosc-lz4":
        return zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    if codec == "zstd":
        return zarr.codecs.ZstdCodec(level=3)
    if codec == "none":
        return None
    raise ValueError(f"unknown codec {codec!r}; allowed: {', '.join(CODECS)}")


def _chunk_key(arr: zarr.Array, chunk: int) -> str:
    key = arr.metadata.encode_chunk_key((chunk,) + (0,) * (arr.ndim - 1))
    return f"{arr.path}/{key}" if arr.path else key


def _channel_stats(x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Per-channel (count, mean, M2) of x (n, C, *grid), in float64."""
    flat = np.moveaxis(x.reshape(x.shape[0], x.shape[1], -1), 1, 0).reshape(x.shape[1], -1)  # (C, n*prod(grid))
    flat = flat.astype(np.float64)
    mean = flat.mean(axis=1)
    m2 = ((flat - mean[:, None]) ** 2).sum(axis=1)
    return flat.shape[1], mean, m2


def _combine_stats(parts: list[tuple[int, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Population mean/std from per-chunk (count, mean, M2): Chan et al. (1979) pairwise update, all at once."""
    counts = np.array([p[0] for p in parts], dtype=np.float64)[:, None]  # (chunks, 1)
    means = np.stack([p[1] for p in parts])  # (chunks, C)
    m2s = np.stack([p[2] for p in parts])
    total = counts.sum()
    mean = (counts * means).sum(axis=0) / total
    m2 = (m2s + counts * (means - mean) ** 2).sum(axis=0)
    return mean, np.sqrt(m2 / total)


class FieldDataset:
    """A validated, read-only view of a dataset group.

    Everything the loader relies on (arrays, shapes, chunking, attributes) is checked here,
    so a bad dataset fails at open time with a message naming the URL and the offending part.
    """

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self._store = open_zarr_store(url, storage_options, read_only=True)
        try:
            group = zarr.open_group(self._store, mode="r", zarr_format=3)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{url}: not a Zarr v3 group or store does not exist ({type(e).__name__}: {e})") from e

        present = sorted(group.array_keys())
        arrays = {}
        for name in ARRAY_NAMES:
            if name not in present:
                raise ValueError(f"{url}: missing array {name!r}; arrays present: {present or 'none'}")
            arr = group[name]
            if arr.ndim < 3:
                raise ValueError(f"{url}: array {name!r} has ndim {arr.ndim} (shape {arr.shape}); "
                                 "expected (N, C, *grid) with ndim >= 3")
            if not np.issubdtype(arr.dtype, np.floating):
                raise ValueError(f"{url}: array {name!r} has dtype {arr.dtype}; expected a float dtype")
            if arr.shards is not None or tuple(arr.chunks[1:]) != tuple(arr.shape[1:]):
                raise ValueError(f"{url}: array {name!r} has chunks {arr.chunks} (shards {arr.shards}) for shape "
                                 f"{arr.shape}; expected unsharded chunks ({arr.chunks[0]}, *{tuple(arr.shape[1:])})"
                                 " i.e. chunked along N only")
            arrays[name] = arr
        self.inputs, self.targets = arrays["inputs"], arrays["targets"]

        if self.inputs.shape[0] != self.targets.shape[0]:
            raise ValueError(f"{url}: 'inputs' has {self.inputs.shape[0]} samples but 'targets' has "
                             f"{self.targets.shape[0]}")
        if self.inputs.chunks[0] != self.targets.chunks[0]:
            raise ValueError(f"{url}: chunk length along N differs: 'inputs' {self.inputs.chunks[0]}, "
                             f"'targets' {self.targets.chunks[0]}")
        if self.inputs.shape[2:] != self.targets.shape[2:]:
            raise ValueError(f"{url}: grid shape differs: 'inputs' {self.inputs.shape[2:]}, "
                             f"'targets' {self.targets.shape[2:]}")

        self.attrs = dict(group.attrs)
        missing = [k for k in REQUIRED_ATTRS if k not in self.attrs]
        if missing:
            raise ValueError(f"{url}: group attributes missing keys {missing}; required: {list(REQUIRED_ATTRS)}")
        if self.attrs["fieldtrain_version"] != FORMAT_VERSION:
            raise ValueError(f"{url}: attribute 'fieldtrain_version' is {self.attrs['fieldtrain_version']!r}; "
                             f"this code reads version {FORMAT_VERSION}")
        if self.attrs["num_samples"] != self.inputs.shape[0]:
            raise ValueError(f"{url}: attribute 'num_samples' is {self.attrs['num_samples']} but the arrays "
                             f"hold {self.inputs.shape[0]}")
        for name, arr in arrays.items():
            stats = self.attrs["normalization"].get(name) if isinstance(self.attrs["normalization"], dict) else None
            if (not isinstance(stats, dict) or len(stats.get("mean", ())) != arr.shape[1]
                    or len(stats.get("std", ())) != arr.shape[1]):
                raise ValueError(f"{url}: attribute normalization[{name!r}] must hold 'mean' and 'std' with "
                                 f"{arr.shape[1]} entries (one per channel); got {stats!r}")

        self.num_samples = int(self.inputs.shape[0])
        self.chunk_size = int(self.inputs.chunks[0])
        self.num_chunks = math.ceil(self.num_samples / self.chunk_size)
        self.input_shape = tuple(self.inputs.shape[1:])
        self.target_shape = tuple(self.targets.shape[1:])

    def __repr__(self) -> str:
        return (f"FieldDataset({self.url!r}, N={self.num_samples}, inputs={self.input_shape}, "
                f"targets={self.target_shape}, chunk_size={self.chunk_size})")

    def normalization(self) -> dict:
        """Per-channel statistics {"inputs": {"mean": [...], "std": [...]}, "targets": {...}}."""
        return self.attrs["normalization"]

    def _check_chunks_exist(self, chunks: range) -> None:
        # Zarr silently returns fill values for absent chunks; a missing chunk must be an error.
        keys = [(name, c, _chunk_key(arr, c)) for name, arr in (("inputs", self.inputs), ("targets", self.targets))
                for c in chunks]

        async def _exists() -> list[bool]:
            return await asyncio.gather(*(self._store.exists(k) for _, _, k in keys))

        for (name, c, key), ok in zip(keys, sync(_exists())):
            if not ok:
                raise ValueError(f"{self.url}: chunk {c} of array {name!r} is missing (key {key!r})")

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Samples [start, stop) as float32 arrays (stop - start, C, *grid)."""
        if not 0 <= start < stop <= self.num_samples:
            raise ValueError(f"{self.url}: sample range [{start}, {stop}) invalid; need 0 <= start < stop <= "
                             f"{self.num_samples}")
        chunks = range(start // self.chunk_size, (stop - 1) // self.chunk_size + 1)
        self._check_chunks_exist(chunks)
        out = []
        for name, arr in (("inputs", self.inputs), ("targets", self.targets)):
            try:
                out.append(np.asarray(arr[start:stop], dtype=np.float32))
            except Exception as e:  # codec / store errors: find and name the bad chunk
                bad = chunks[0]
                for c in chunks:
                    try:
                        arr[c * self.chunk_size:(c + 1) * self.chunk_size]
                    except Exception:
                        bad = c
                        break
                raise ValueError(f"{self.url}: chunk {bad} of array {name!r} is corrupt or unreadable (key "
                                 f"{_chunk_key(arr, bad)!r}; {type(e).__name__}: {e})") from e
        return out[0], out[1]

    def read_chunk(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole chunk `chunk` along N (the last chunk may be shorter)."""
        return self.read_chunks([chunk])[0]

    def read_chunks(self, chunks: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Whole chunks, fetched and decoded concurrently in one pass over the store (on an object store
        the requests overlap, so k chunks cost about one round trip, not k)."""
        for c in chunks:
            if not 0 <= c < self.num_chunks:
                raise ValueError(f"{self.url}: chunk {c} out of range; dataset has chunks 0..{self.num_chunks - 1}")
        arrays = (("inputs", self.inputs), ("targets", self.targets))
        jobs = [(name, arr, c) for c in chunks for name, arr in arrays]

        async def fetch(arr: zarr.Array, c: int):
            key = _chunk_key(arr, c)
            exists, data = await asyncio.gather(self._store.exists(key), arr.async_array.getitem(
                slice(c * self.chunk_size, min((c + 1) * self.chunk_size, self.num_samples))))
            return exists, data

        async def fetch_all():
            return await asyncio.gather(*(fetch(arr, c) for _, arr, c in jobs), return_exceptions=True)

        results = sync(fetch_all())
        out = []
        for (name, arr, c), r in zip(jobs, results):
            if isinstance(r, BaseException):  # codec / store errors, named by chunk
                raise ValueError(f"{self.url}: chunk {c} of array {name!r} is corrupt or unreadable (key "
                                 f"{_chunk_key(arr, c)!r}; {type(r).__name__}: {r})") from r
            exists, data = r
            if not exists:  # Zarr silently returns fill values for absent chunks
                raise ValueError(f"{self.url}: chunk {c} of array {name!r} is missing (key {_chunk_key(arr, c)!r})")
            out.append(np.asarray(data, dtype=np.float32))
        return list(zip(out[0::2], out[1::2]))


class FieldDatasetWriter:
    """Creates the group and arrays up front, then takes whole chunks; finish() writes stats + attrs.

    Until finish() the group lacks the 'normalization' attribute, so a half-written dataset
    fails FieldDataset validation instead of being silently read.
    """

    def __init__(self, url: str, num_samples: int, input_shape: tuple, target_shape: tuple, chunk_size: int,
                 generator: str, params: dict, grid_bounds, storage_options: dict | None = None,
                 codec: str = "blosc-lz4", overwrite: bool = False, resume: bool = False):
        input_shape, target_shape = tuple(int(d) for d in input_shape), tuple(int(d) for d in target_shape)
        if num_samples < 1 or chunk_size < 1:
            raise ValueError(f"{url}: num_samples ({num_samples}) and chunk_size ({chunk_size}) must be >= 1")
        for name, shape in (("inputs", input_shape), ("targets", target_shape)):
            if len(shape) < 2 or min(shape) < 1:
                raise ValueError(f"{url}: {name} sample shape {shape} must be (C, *grid) with positive sizes")
        if input_shape[1:] != target_shape[1:]:
            raise ValueError(f"{url}: grid of inputs {input_shape[1:]} differs from grid of targets "
                             f"{target_shape[1:]}")
        bounds = np.asarray(grid_bounds, dtype=np.float64)
        if bounds.shape != (len(input_shape) - 1, 2) or not np.all(bounds[:, 0] < bounds[:, 1]):
            raise ValueError(f"{url}: grid_bounds {grid_bounds!r} must be [[lo, hi]] * {len(input_shape) - 1} "
                             "with lo < hi")
        try:
            json.dumps(params)
        except TypeError as e:
            raise ValueError(f"{url}: params must be JSON-serialisable ({e})") from e
        compressors = _compressors(codec)

        store = open_zarr_store(url, storage_options, read_only=False)
        empty = store_is_empty(url, storage_options, store)

        self.url, self.num_samples, self.chunk_size = url, int(num_samples), int(chunk_size)
        self.num_chunks = math.ceil(self.num_samples / self.chunk_size)
        self.input_shape, self.target_shape = input_shape, target_shape
        self._store = store
        self._finished = False
        attrs = {"fieldtrain_version": FORMAT_VERSION, "generator": generator, "params": params,
                 "grid": {"shape": list(input_shape[1:]), "bounds": bounds.tolist()},
                 "num_samples": self.num_samples}
        if not empty and resume and not overwrite:
            self._resume(attrs)
            return
        if not empty and not overwrite:
            raise ValueError(f"{url}: store already exists and is not empty; pass overwrite=True to replace it "
                             "(or resume=True to continue an interrupted generation)")
        self._group = zarr.open_group(store, mode="w", zarr_format=3, attributes=attrs)
        self._arrays = {
            name: self._group.create_array(
                name, shape=(self.num_samples, *shape), dtype="float32", chunks=(self.chunk_size, *shape),
                compressors=compressors, fill_value=np.nan,
                # Store every chunk, even all-fill ones, so readers can treat an absent key as an error.
                config={"write_empty_chunks": True})
            for name, shape in (("inputs", input_shape), ("targets", target_shape))
        }

    def _resume(self, attrs: dict) -> None:
        """Continue an unfinished dataset written with the same generator, parameters and layout."""
        try:
            self._group = zarr.open_group(self._store, mode="r+", zarr_format=3)
        except Exception as e:
            raise ValueError(f"{self.url}: cannot resume, not a dataset group ({type(e).__name__}: {e})") from None
        old = dict(self._group.attrs)
        if "normalization" in old:
            raise ValueError(f"{self.url}: dataset is already complete; nothing to resume")
        differ = [k for k in attrs if old.get(k) != attrs[k]]
        if differ:
            raise ValueError(f"{self.url}: cannot resume, existing dataset differs in {differ}: "
                             f"{ {k: old.get(k) for k in differ} } vs requested { {k: attrs[k] for k in differ} }")
        self._arrays = {name: self._group[name] for name in ARRAY_NAMES}
        for name, shape in (("inputs", self.input_shape), ("targets", self.target_shape)):
            arr = self._arrays[name]
            if arr.shape != (self.num_samples, *shape) or arr.chunks[0] != self.chunk_size:
                raise ValueError(f"{self.url}: cannot resume, array {name!r} has shape {arr.shape} chunks "
                                 f"{arr.chunks}; requested {(self.num_samples, *shape)} in chunks of {self.chunk_size}")

    @classmethod
    def attach(cls, url: str, storage_options: dict | None = None) -> "FieldDatasetWriter":
        """Open an unfinished dataset to write chunks into (e.g. from a generation task on another node)."""
        store = open_zarr_store(url, storage_options, read_only=False)
        group = zarr.open_group(store, mode="r+", zarr_format=3)
        attrs = dict(group.attrs)
        self = cls.__new__(cls)
        self.url, self._store, self._group, self._finished = url, store, group, False
        self._arrays = {name: group[name] for name in ARRAY_NAMES}
        self.num_samples, self.chunk_size = int(attrs["num_samples"]), int(self._arrays["inputs"].chunks[0])
        self.num_chunks = math.ceil(self.num_samples / self.chunk_size)
        self.input_shape = tuple(self._arrays["inputs"].shape[1:])
        self.target_shape = tuple(self._arrays["targets"].shape[1:])
        return self

    def completed_chunks(self) -> dict[int, dict]:
        """Chunks whose completion marker exists, with the per-channel statistics the marker carries."""
        async def _read() -> dict[int, dict]:
            keys = [k async for k in self._store.list_prefix(f"{PROGRESS_PREFIX}/")]
            bufs = await asyncio.gather(*(self._store.get(k, prototype=default_buffer_prototype()) for k in keys))
            return {int(k.rsplit("/", 1)[1].split(".")[0]): json.loads(b.to_bytes()) for k, b in zip(keys, bufs)
                    if b is not None}
        return sync(_read())

    def write_chunk(self, chunk: int, inputs: np.ndarray, targets: np.ndarray) -> None:
        """Write chunk `chunk` (rows chunk*chunk_size ...) and record its per-channel statistics."""
        if self._finished:
            raise ValueError(f"{self.url}: write_chunk({chunk}) after finish()")
        if not 0 <= chunk < self.num_chunks:
            raise ValueError(f"{self.url}: chunk {chunk} out of range; dataset has chunks 0..{self.num_chunks - 1}")
        start = chunk * self.chunk_size
        stop = min(start + self.chunk_size, self.num_samples)
        stats = {}
        for name, x, shape in (("inputs", inputs, self.input_shape), ("targets", targets, self.target_shape)):
            x = np.asarray(x)
            if x.shape != (stop - start, *shape):
                raise ValueError(f"{self.url}: chunk {chunk} of {name!r} has shape {x.shape}; expected "
                                 f"{(stop - start, *shape)}")
            if not np.isfinite(x).all():
                raise ValueError(f"{self.url}: chunk {chunk} of {name!r} contains non-finite values")
            x = x.astype(np.float32, copy=False)
            self._arrays[name][start:stop] = x
            count, mean, m2 = _channel_stats(x)
            stats[name] = {"count": count, "mean": mean.tolist(), "m2": m2.tolist()}
        # The marker is written after the chunk's data: a chunk with a marker is complete.
        marker = json.dumps(stats).encode()
        sync(self._store.set(f"{PROGRESS_PREFIX}/{chunk}.json", default_buffer_prototype().buffer.from_bytes(marker)))

    def finish(self) -> None:
        """Check every chunk was written, then store per-channel mean/std (population, ddof=0)."""
        done = self.completed_chunks()
        missing = sorted(set(range(self.num_chunks)) - set(done))
        if missing:
            shown = missing[:10] + (["..."] if len(missing) > 10 else [])
            raise ValueError(f"{self.url}: cannot finish, {len(missing)} chunk(s) never written: {shown}")
        norm = {}
        for name in ARRAY_NAMES:
            parts = [(done[c][name]["count"], np.array(done[c][name]["mean"]), np.array(done[c][name]["m2"]))
                     for c in range(self.num_chunks)]
            mean, std = _combine_stats(parts)
            norm[name] = {"mean": mean.tolist(), "std": std.tolist()}
        self._group.attrs.update({"normalization": norm})
        sync(self._store.delete_dir(PROGRESS_PREFIX))
        self._finished = True


def write_field_dataset(url: str, inputs: np.ndarray, targets: np.ndarray, *, chunk_size: int, generator: str,
                        params: dict, grid_bounds, storage_options: dict | None = None, codec: str = "blosc-lz4",
                        overwrite: bool = False) -> None:
    """Write in-memory arrays inputs (N, C_in, *grid) and targets (N, C_out, *grid) as a dataset group."""
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    if inputs.ndim < 3 or targets.ndim < 3 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"{url}: inputs {inputs.shape} and targets {targets.shape} must be (N, C, *grid) "
                         "with the same N")
    writer = FieldDatasetWriter(url, inputs.shape[0], inputs.shape[1:], targets.shape[1:], chunk_size, generator,
                                params, grid_bounds, storage_options=storage_options, codec=codec,
                                overwrite=overwrite)
    for c in range(writer.num_chunks):
        sl = slice(c * chunk_size, (c + 1) * chunk_size)
        writer.write_chunk(c, inputs[sl], targets[sl])
    writer.finish()
