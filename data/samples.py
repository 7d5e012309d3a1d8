"""Zarr v3 stores of generated samples (e.g. a diffusion model's), written chunk by chunk and resumable.

Layout of a sample group::

    <url>/zarr.json             attributes: format version, meta (what made the samples), layout, and once
                                finished "complete": true and per-array "stats" (mean/std over all values)
    <url>/samples               float32 (num_rows, *sample_shape), chunks (chunk_size, *sample_shape)
    <url>/<extra>               optional float32 (num_rows, *shape) arrays written alongside (truth, cond, ...)
    <url>/progress/<chunk>.json per-array count/mean/m2/std of a written chunk; removed by finish()

As with data.store's datasets, chunk i of every array is written before its marker, so a chunk with a
marker is whole and a rerun with the same meta skips it; different meta is refused, naming the keys.
"""

from __future__ import annotations

import json
import math

import numpy as np
import zarr
from zarr.core.sync import sync

from data.store import (PROGRESS_PREFIX, _channel_stats, _combine_stats, _compressors, _progress_markers,
                        create_row_chunked_array, open_zarr_store, require_all_chunks, store_is_empty,
                        write_progress_marker)

FORMAT_VERSION = 1
SAMPLES = "samples"


def _layout(num_rows: int, chunk_size: int, shapes: dict[str, tuple]) -> dict:
    return {"num_rows": int(num_rows), "chunk_size": int(chunk_size),
            "arrays": {name: [int(d) for d in shape] for name, shape in shapes.items()}}


def _read_layout(group: zarr.Group) -> tuple[int, int, int, dict[str, tuple]]:
    """(num_rows, chunk_size, num_chunks, {array: row shape}) of a sample group."""
    layout = group.attrs["layout"]
    num_rows, chunk_size = int(layout["num_rows"]), int(layout["chunk_size"])
    return (num_rows, chunk_size, math.ceil(num_rows / chunk_size),
            {name: tuple(shape) for name, shape in layout["arrays"].items()})


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Keys (dotted below `meta`) whose values differ between two attribute dicts."""
    return [prefix + k for k in sorted(set(old) | set(new)) if old.get(k, "<absent>") != new.get(k, "<absent>")]


class SampleStoreWriter:
    """Creates (or resumes) a sample group, takes whole chunks, and finish() seals it.

    `meta` is a JSON-serialisable description of what makes the samples (run, checkpoint, sampler, steps, seed,
    ...). An existing store resumes (resume=True) only when its meta and layout equal the requested ones; a
    finished one with the same meta is simply complete (`finished`), nothing is rewritten.
    """

    def __init__(self, url: str, num_rows: int, sample_shape: tuple, chunk_size: int, meta: dict,
                 storage_options: dict | None = None, codec: str = "blosc-lz4", overwrite: bool = False,
                 resume: bool = True, extra_arrays: dict[str, tuple] | None = None):
        shapes = {SAMPLES: tuple(sample_shape), **{k: tuple(v) for k, v in (extra_arrays or {}).items()}}
        if num_rows < 1 or chunk_size < 1:
            raise ValueError(f"{url}: num_rows ({num_rows}) and chunk_size ({chunk_size}) must be >= 1")
        for name, shape in shapes.items():
            if any(d < 1 for d in shape):
                raise ValueError(f"{url}: row shape {shape} of array {name!r} must have positive sizes")
        try:
            meta = json.loads(json.dumps(meta))   # as stored, so a resumed run compares like with like
        except TypeError as e:
            raise ValueError(f"{url}: meta must be JSON-serialisable ({e})") from e
        if not isinstance(meta, dict):
            raise ValueError(f"{url}: meta must be a dict, got {type(meta).__name__}")
        compressors = _compressors(codec)
        attrs = {"fieldtrain_samples_version": FORMAT_VERSION, "meta": meta,
                 "layout": _layout(num_rows, chunk_size, shapes)}
        store = open_zarr_store(url, storage_options, read_only=False)
        empty = store_is_empty(url, storage_options, store)
        if not empty and not overwrite:
            if not resume:
                raise ValueError(f"{url}: store already exists and is not empty; pass overwrite=True to replace it "
                                 "(or resume=True to continue an interrupted run)")
            group = _open_sample_group(url, store, mode="r+")
            differ = _differences(group.attrs["meta"], meta, "meta.") + _differences(group.attrs["layout"],
                                                                                     attrs["layout"])
            if differ:
                old = {**group.attrs["layout"], **{f"meta.{k}": v for k, v in group.attrs["meta"].items()}}
                new = {**attrs["layout"], **{f"meta.{k}": v for k, v in meta.items()}}
                state = "complete" if group.attrs.get("complete") else "unfinished"
                raise ValueError(f"{url}: cannot resume, the {state} store there differs in {differ}: stored "
                                 f"{ {k: old.get(k, '<absent>') for k in differ} } vs requested "
                                 f"{ {k: new.get(k, '<absent>') for k in differ} };"
                                 " pass overwrite=True (--overwrite) to replace it, or write to another URL")
        else:
            group = zarr.open_group(store, mode="w", zarr_format=3, attributes=attrs)
            for name, shape in shapes.items():
                create_row_chunked_array(group, name, num_rows, shape, chunk_size, compressors)
        self._init(url, store, group)

    def _init(self, url: str, store, group: zarr.Group) -> None:
        self.url, self._store, self._group = url, store, group
        self.meta = dict(group.attrs["meta"])
        self.num_rows, self.chunk_size, self.num_chunks, self.shapes = _read_layout(group)
        self.sample_shape = self.shapes[SAMPLES]
        self.finished = bool(group.attrs.get("complete"))
        self._arrays = {name: group[name] for name in self.shapes}

    @classmethod
    def attach(cls, url: str, storage_options: dict | None = None) -> "SampleStoreWriter":
        """Open an existing sample store to write chunks into (from a Ray task or another rank)."""
        store = open_zarr_store(url, storage_options, read_only=False)
        self = cls.__new__(cls)
        self._init(url, store, _open_sample_group(url, store, mode="r+"))
        return self

    def rows(self, chunk: int) -> tuple[int, int]:
        """The row range [start, stop) of chunk `chunk` (the last chunk may be shorter)."""
        if not 0 <= chunk < self.num_chunks:
            raise ValueError(f"{self.url}: chunk {chunk} out of range; the store has chunks 0..{self.num_chunks - 1}")
        return chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, self.num_rows)

    def completed_chunks(self) -> dict[int, dict | None]:
        """Chunks written so far, with the per-array statistics their markers carry (all chunks once finished)."""
        if self.finished:
            return dict.fromkeys(range(self.num_chunks))
        return _progress_markers(self._store)

    def num_completed(self) -> int:
        """How many chunks are written (lists the markers without reading them)."""
        return self.num_chunks if self.finished else len(_progress_markers(self._store, read=False))

    def write_chunk(self, chunk: int, data: np.ndarray | dict[str, np.ndarray]) -> dict:
        """Write chunk `chunk` of "samples" (an array) or of each named array (a dict holding every array of the
        store), then its completion marker. Everything is checked before anything is written."""
        if self.finished:
            raise ValueError(f"{self.url}: write_chunk({chunk}) on a finished store")
        start, stop = self.rows(chunk)
        parts = dict(data) if isinstance(data, dict) else {SAMPLES: data}
        if set(parts) != set(self.shapes):
            raise ValueError(f"{self.url}: chunk {chunk} brings arrays {sorted(parts)}; the store holds "
                             f"{sorted(self.shapes)} (return a dict with all of them, or one array for 'samples')")
        checked = {}
        for name, x in parts.items():
            x = np.asarray(x)
            if x.shape != (stop - start, *self.shapes[name]):
                raise ValueError(f"{self.url}: chunk {chunk} (rows {start}:{stop}) of {name!r} has shape {x.shape}; "
                                 f"expected {(stop - start, *self.shapes[name])}")
            if x.dtype.kind not in "fiub":
                raise ValueError(f"{self.url}: chunk {chunk} of {name!r} has dtype {x.dtype}; expected real numbers")
            if (bad := x.size - int(np.isfinite(x).sum())) > 0:
                raise ValueError(f"{self.url}: chunk {chunk} (rows {start}:{stop}) of {name!r} contains {bad} "
                                 "non-finite value(s)")
            checked[name] = x.astype(np.float32, copy=False)
        stats = {}
        for name, x in checked.items():
            self._arrays[name][start:stop] = x
            count, mean, m2 = _channel_stats(x.reshape(len(x), 1, -1))   # all values of the chunk as one channel
            stats[name] = {"count": count, "mean": float(mean[0]), "m2": float(m2[0]),
                           "std": float(np.sqrt(m2[0] / count))}
        write_progress_marker(self._store, chunk, stats)
        return stats

    def finish(self) -> None:
        """Check every chunk is written, store per-array mean/std (population) and mark the group complete."""
        if self.finished:
            return
        done = self.completed_chunks()
        require_all_chunks(self.url, self.num_chunks, done)
        stats = {}
        for name in self.shapes:
            parts = [(done[c][name]["count"], np.array([done[c][name]["mean"]]), np.array([done[c][name]["m2"]]))
                     for c in range(self.num_chunks)]
            mean, std = _combine_stats(parts)
            stats[name] = {"mean": float(mean[0]), "std": float(std[0])}
        self._group.attrs.update({"stats": stats, "complete": True})
        sync(self._store.delete_dir(PROGRESS_PREFIX))
        self.finished = True


def _open_sample_group(url: str, store, mode: str) -> zarr.Group:
    try:
        group = zarr.open_group(store, mode=mode, zarr_format=3)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{url}: not a Zarr v3 group or store does not exist ({type(e).__name__}: {e})") from None
    version = group.attrs.get("fieldtrain_samples_version")
    if version is None:
        raise ValueError(f"{url}: not a sample store (no 'fieldtrain_samples_version' attribute); pass "
                         "overwrite=True (--overwrite) to replace what is there, or write to another URL")
    if version != FORMAT_VERSION:
        raise ValueError(f"{url}: sample store version {version!r}; this code reads version {FORMAT_VERSION}")
    return group


class SampleSet:
    """A finished sample store, read-only: `meta`, `stats`, the zarr `arrays`, and read()."""

    def __init__(self, url: str, group: zarr.Group):
        self.url, self.meta, self.stats = url, dict(group.attrs["meta"]), dict(group.attrs["stats"])
        self.num_rows, self.chunk_size, self.num_chunks, self.shapes = _read_layout(group)
        self.sample_shape = self.shapes[SAMPLES]
        self.arrays = {name: group[name] for name in self.shapes}

    def read(self, start: int = 0, stop: int | None = None, name: str = SAMPLES) -> np.ndarray:
        """Rows [start, stop) of array `name` as float32 (stop defaults to all rows)."""
        if name not in self.arrays:
            raise ValueError(f"{self.url}: no array {name!r}; arrays: {sorted(self.arrays)}")
        stop = self.num_rows if stop is None else stop
        if not 0 <= start < stop <= self.num_rows:
            raise ValueError(f"{self.url}: row range [{start}, {stop}) invalid; need 0 <= start < stop <= "
                             f"{self.num_rows}")
        return np.asarray(self.arrays[name][start:stop], dtype=np.float32)

    def __repr__(self) -> str:
        return f"SampleSet({self.url!r}, rows={self.num_rows}, shapes={self.shapes}, chunk_size={self.chunk_size})"


def open_samples(url: str, storage_options: dict | None = None) -> SampleSet:
    """Open a finished sample store; an unfinished one is refused, saying how far it got and how to resume."""
    store = open_zarr_store(url, storage_options, read_only=True)
    group = _open_sample_group(url, store, mode="r")
    if not group.attrs.get("complete"):
        total = _read_layout(group)[2]
        done = len(_progress_markers(store, read=False))
        command = group.attrs["meta"].get("command")
        how = (f"rerun the command that wrote it: {command}" if command else
               f"rerun the same command (`fieldtrain sample ... --out {url}`, or run_sampling with the same job)")
        raise ValueError(f"{url}: sampling is unfinished, {done} of {total} chunks done; finished chunks are kept, "
                         f"resume it: {how}")
    return SampleSet(url, group)
