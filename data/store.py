"""Zarr v3 storage for field datasets: one group per dataset, opened from any fsspec URL.

Layout of a dataset group::

    <url>/zarr.json             group attributes (see REQUIRED_ATTRS)
    <url>/inputs                float32 (N, C_in, *grid),  chunks (chunk_size, C_in, *grid)
    <url>/targets               float32 (N, C_out, *grid), chunks (chunk_size, C_out, *grid)

Chunking is along the sample axis N only, so a chunk is the unit of I/O for the loader
and chunk i lives under the key ``<array>/c/<i>/0/0...``. Every chunk ends with a CRC32C of its
encoded bytes (zarr's ``crc32c`` codec after the compressor), so a changed byte is a read error,
not silently different values; stores written before that still open, with a warning.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import warnings
from collections.abc import Sequence

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

log = logging.getLogger("fieldtrain.data")

FORMAT_VERSION = 1
ARRAY_NAMES = ("inputs", "targets")
REQUIRED_ATTRS = ("fieldtrain_version", "generator", "params", "grid", "num_samples", "normalization")
CODECS = ("blosc-lz4", "zstd", "none")
PROGRESS_PREFIX = "progress"   # <url>/progress/<chunk>.json: a written chunk's marker and statistics
VERIFY_BATCH_BYTES = 256 << 20  # decoded bytes that verify() holds at once
_warned_unprotected: set[str] = set()


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


def _compressors(codec: str) -> list:
    """The bytes-to-bytes codecs of a new array: the compressor, then a CRC32C of the compressed bytes."""
    if codec == "blosc-lz4":
        return [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()]
    if codec == "zstd":
        return [zarr.codecs.ZstdCodec(level=3), Crc32cCodec()]
    if codec == "none":
        return [Crc32cCodec()]
    raise ValueError(f"unknown codec {codec!r}; allowed: {', '.join(CODECS)}")


def codec_name(arr: zarr.Array) -> str:
    """The CODECS entry an array was written with (the checksum aside), e.g. to regenerate it alike."""
    names = [type(c).__name__ for c in arr.compressors if not isinstance(c, Crc32cCodec)]
    if names == ["BloscCodec"] and arr.compressors[0].cname.value == "lz4":
        return "blosc-lz4"
    return {(): "none", ("ZstdCodec",): "zstd"}.get(tuple(names), "+".join(names))


def _chunk_key(arr: zarr.Array, chunk: int) -> str:
    key = arr.metadata.encode_chunk_key((chunk,) + (0,) * (arr.ndim - 1))
    return f"{arr.path}/{key}" if arr.path else key


class _MissingChunk(LookupError):
    """A chunk key that does not exist (zarr would silently return fill values for it)."""


def _chunk_problem(e: BaseException) -> str:
    """What went wrong reading a chunk, in words: a checksum mismatch, an undecodable or an unreadable chunk."""
    if isinstance(e, ValueError) and "checksum" in str(e):
        return "corrupt: checksum mismatch"
    if isinstance(e, OSError):
        return "unreadable"
    return "corrupt: cannot be decoded"


def _progress_markers(store, read: bool = True) -> dict[int, dict | None]:
    """Completion markers of an unfinished generation: chunk -> the statistics its marker carries (None
    with read=False, which only lists them)."""
    async def _read() -> dict[int, dict | None]:
        keys = [k async for k in store.list_prefix(f"{PROGRESS_PREFIX}/")]
        chunks = [int(k.rsplit("/", 1)[1].split(".")[0]) for k in keys]
        if not read:
            return dict.fromkeys(chunks)
        bufs = await asyncio.gather(*(store.get(k, prototype=default_buffer_prototype()) for k in keys))
        return {c: json.loads(b.to_bytes()) for c, b in zip(chunks, bufs) if b is not None}
    try:
        return sync(_read())
    except FileNotFoundError:
        return {}


def write_progress_marker(store, chunk: int, stats: dict) -> None:
    """Mark chunk `chunk` complete, with its statistics. Written after the chunk's data: a chunk with a marker is
    whole, so a resumed writer skips exactly the chunks that have one."""
    marker = json.dumps(stats).encode()
    sync(store.set(f"{PROGRESS_PREFIX}/{chunk}.json", default_buffer_prototype().buffer.from_bytes(marker)))


def require_all_chunks(url: str, num_chunks: int, done) -> None:
    """Refuse to finish a store while some of its chunks 0..num_chunks-1 have no completion marker."""
    missing = sorted(set(range(num_chunks)) - set(done))
    if missing:
        shown = missing[:10] + (["..."] if len(missing) > 10 else [])
        raise ValueError(f"{url}: cannot finish, {len(missing)} chunk(s) never written: {shown}")


def create_row_chunked_array(group: zarr.Group, name: str, num_rows: int, row_shape: tuple, chunk_size: int,
                             compressors: list) -> zarr.Array:
    """A float32 array (num_rows, *row_shape) chunked along its first axis only, NaN until written."""
    return group.create_array(name, shape=(num_rows, *row_shape), dtype="float32", chunks=(chunk_size, *row_shape),
                              compressors=compressors, fill_value=np.nan,
                              # Store every chunk, even all-fill ones, so readers can treat an absent key as an error.
                              config={"write_empty_chunks": True})


def format_bad_chunks(url: str, bad: list[dict]) -> str:
    """verify()'s findings as lines: one per bad (array, chunk), naming the chunk, array and key."""
    lines = [f"{url}: {len(bad)} bad chunk(s):"]
    lines += [f"  chunk {b['chunk']} of array {b['array']!r} (key {b['key']!r}): {b['error']}" for b in bad]
    return "\n".join(lines)


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

        with warnings.catch_warnings():  # an unfinished generation's progress/ folder is not a zarr node
            warnings.filterwarnings("ignore", message=f"Object at {PROGRESS_PREFIX} is not recognized")
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
        if missing == ["normalization"]:
            raise ValueError(self._unfinished_message(storage_options))
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
        if not self.checksummed and url not in _warned_unprotected:
            _warned_unprotected.add(url)
            log.warning("%s", self._unprotected_message(storage_options))

    @property
    def checksummed(self) -> bool:
        """Whether every chunk of both arrays carries a CRC32C (zarr's crc32c codec, the last codec)."""
        return all(arr.compressors and isinstance(arr.compressors[-1], Crc32cCodec)
                   for arr in (self.inputs, self.targets))

    def _generate_command(self, storage_options: dict | None, overwrite: bool = False) -> str | None:
        from data.generate import generate_command  # data.generate imports this module
        try:
            return generate_command(self.url, self.attrs, codec=codec_name(self.inputs), overwrite=overwrite,
                                    storage_options=storage_options)
        except (ValueError, KeyError, TypeError):  # not written by `fieldtrain data generate`
            return None

    def _unfinished_message(self, storage_options: dict | None) -> str:
        total = math.ceil(self.inputs.shape[0] / self.inputs.chunks[0])
        done = len(_progress_markers(self._store, read=False))
        head = (f"{self.url}: dataset generation is unfinished, {done} of {total} chunks complete (the group "
                "attribute 'normalization' is written when all are)")
        command = self._generate_command(storage_options)
        if command is None:
            return (f"{head}; its writer ({self.attrs.get('generator')!r}) stopped before "
                    "FieldDatasetWriter.finish(): write the missing chunks and call finish(), or rewrite the store")
        return f"{head}; resume it with: {command}"

    def _unprotected_message(self, storage_options: dict | None) -> str:
        command = self._generate_command(storage_options, overwrite=True)
        fix = (f"regenerate it (same seed, same arrays) to get one: {command}" if command else
               "rewrite it with the current fieldtrain (FieldDatasetWriter / write_field_dataset) to get one")
        return (f"{self.url}: chunks carry no checksum (written before fieldtrain stored a crc32c per chunk), so a "
                f"changed byte can go unnoticed; `fieldtrain data verify` still finds missing and undecodable "
                f"chunks; {fix}")

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
                bad, err = chunks[0], e
                for c in chunks:
                    try:
                        arr[c * self.chunk_size:(c + 1) * self.chunk_size]
                    except Exception as chunk_error:
                        bad, err = c, chunk_error
                        break
                raise ValueError(f"{self.url}: chunk {bad} of array {name!r} is {_chunk_problem(err)} (key "
                                 f"{_chunk_key(arr, bad)!r}; {type(err).__name__}: {err})") from e
        return out[0], out[1]

    def read_chunk(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole chunk `chunk` along N (the last chunk may be shorter)."""
        return self.read_chunks([chunk])[0]

    def _fetch_chunks(self, chunks: Sequence[int]) -> list[tuple[str, int, str, BaseException | None, np.ndarray]]:
        """(array, chunk, key, error, data) for each chunk of both arrays, fetched and decoded concurrently in
        one pass over the store; error is None, _MissingChunk for an absent key, or what reading raised."""
        for c in chunks:
            if not 0 <= c < self.num_chunks:
                raise ValueError(f"{self.url}: chunk {c} out of range; dataset has chunks 0..{self.num_chunks - 1}")
        jobs = [(name, arr, c) for c in chunks for name, arr in (("inputs", self.inputs), ("targets", self.targets))]

        async def fetch(arr: zarr.Array, c: int):
            return await asyncio.gather(self._store.exists(_chunk_key(arr, c)), arr.async_array.getitem(
                slice(c * self.chunk_size, min((c + 1) * self.chunk_size, self.num_samples))))

        async def fetch_all():
            return await asyncio.gather(*(fetch(arr, c) for _, arr, c in jobs), return_exceptions=True)

        out = []
        for (name, arr, c), r in zip(jobs, sync(fetch_all())):
            key = _chunk_key(arr, c)
            if isinstance(r, BaseException):
                out.append((name, c, key, r, None))
            elif not r[0]:  # Zarr silently returns fill values for absent chunks
                out.append((name, c, key, _MissingChunk(key), None))
            else:
                out.append((name, c, key, None, np.asarray(r[1], dtype=np.float32)))
        return out

    def read_chunks(self, chunks: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Whole chunks, fetched and decoded concurrently in one pass over the store (on an object store
        the requests overlap, so k chunks cost about one round trip, not k)."""
        fetched = self._fetch_chunks(chunks)
        for name, c, key, err, _ in fetched:
            if isinstance(err, _MissingChunk):
                raise ValueError(f"{self.url}: chunk {c} of array {name!r} is missing (key {key!r})")
            if err is not None:  # codec / store errors, named by chunk
                raise ValueError(f"{self.url}: chunk {c} of array {name!r} is {_chunk_problem(err)} (key {key!r}; "
                                 f"{type(err).__name__}: {err})") from err
        data = [d for *_, d in fetched]
        return list(zip(data[0::2], data[1::2]))

    def verify(self, chunks: Sequence[int] | None = None, progress: bool = False) -> list[dict]:
        """Read and decode every chunk of both arrays (or only `chunks`), concurrently, a batch at a time.

        Returns one {"array", "chunk", "key", "error"} per bad (array, chunk), in chunk order: missing,
        corrupt (checksum mismatch, undecodable), unreadable, or holding non-finite values (the writer
        refuses those, so they mean damage). An empty list means every chunk read back intact.
        """
        chunks = list(range(self.num_chunks) if chunks is None else chunks)
        chunk_bytes = 4 * self.chunk_size * (math.prod(self.input_shape) + math.prod(self.target_shape))
        per_batch = max(1, VERIFY_BATCH_BYTES // chunk_bytes)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(chunks), desc=f"verify {self.url}", unit="chunk")
        bad = []
        for i in range(0, len(chunks), per_batch):
            for name, c, key, err, data in self._fetch_chunks(chunks[i:i + per_batch]):
                if isinstance(err, _MissingChunk):
                    problem = "missing"
                elif err is not None:
                    problem = f"{_chunk_problem(err)} ({type(err).__name__}: {err})"
                elif (nonfinite := data.size - int(np.isfinite(data).sum())) > 0:
                    problem = f"corrupt: {nonfinite} non-finite value(s)"
                else:
                    continue
                bad.append({"array": name, "chunk": c, "key": key, "error": problem})
            if bar is not None:
                bar.update(len(chunks[i:i + per_batch]))
        if bar is not None:
            bar.close()
        return bad


class FieldDatasetWriter:
    """Creates the group and arrays up front, then takes whole chunks; finish() writes stats + attrs.

    Until finish() the group lacks the 'normalization' attribute, so a half-written dataset
    fails FieldDataset validation (saying how many chunks are complete) instead of being silently read.
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
        self._arrays = {name: create_row_chunked_array(self._group, name, self.num_samples, shape, self.chunk_size,
                                                       compressors)
                        for name, shape in (("inputs", input_shape), ("targets", target_shape))}

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
        return _progress_markers(self._store)

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
        write_progress_marker(self._store, chunk, stats)

    def finish(self) -> None:
        """Check every chunk was written, then store per-channel mean/std (population, ddof=0)."""
        done = self.completed_chunks()
        require_all_chunks(self.url, self.num_chunks, done)
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
