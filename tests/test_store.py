"""Zarr dataset store: round trips over plain paths / file:// / memory://, and every validation error."""

import os
import uuid

import numpy as np
import pytest
import zarr

from data.store import FieldDataset, FieldDatasetWriter, open_zarr_store, write_field_dataset

BOUNDS = [[0.0, 1.0], [0.0, 1.0]]


def _arrays(n=10, c_in=2, c_out=1, grid=(6, 5), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, c_in, *grid)) * np.arange(1, c_in + 1)[None, :, None, None] + 3.0
    y = rng.normal(size=(n, c_out, *grid)) - 1.0
    return x.astype(np.float32), y.astype(np.float32)


def _write(url, x, y, chunk_size=4, **kw):
    write_field_dataset(url, x, y, chunk_size=chunk_size, generator="test", params={"k": 1}, grid_bounds=BOUNDS, **kw)


def _memory_url():
    return f"memory://fieldtrain-test-{uuid.uuid4().hex}/ds.zarr"


@pytest.fixture(params=["plain", "file", "memory"])
def url(request, tmp_path):
    if request.param == "plain":
        return str(tmp_path / "ds.zarr")
    if request.param == "file":
        return f"file://{tmp_path}/nested/ds.zarr"  # parent dir does not exist: needs auto_mkdir
    return _memory_url()


@pytest.mark.parametrize("codec", ["blosc-lz4", "zstd", "none"])
def test_round_trip(url, codec):
    x, y = _arrays()
    _write(url, x, y, codec=codec)
    ds = FieldDataset(url)
    assert (ds.num_samples, ds.chunk_size, ds.num_chunks) == (10, 4, 3)
    assert ds.input_shape == (2, 6, 5) and ds.target_shape == (1, 6, 5)
    assert ds.attrs["generator"] == "test" and ds.attrs["params"] == {"k": 1}
    assert ds.attrs["grid"] == {"shape": [6, 5], "bounds": BOUNDS} and ds.attrs["fieldtrain_version"] == 1
    xi, yi = ds.read(3, 9)  # spans chunks 0..2
    assert xi.dtype == np.float32 and np.array_equal(xi, x[3:9]) and np.array_equal(yi, y[3:9])
    xc, yc = ds.read_chunk(2)  # short last chunk
    assert np.array_equal(xc, x[8:]) and np.array_equal(yc, y[8:])
    norm = ds.normalization()
    np.testing.assert_allclose(norm["inputs"]["mean"], x.mean(axis=(0, 2, 3), dtype=np.float64), rtol=1e-6)
    np.testing.assert_allclose(norm["inputs"]["std"], x.std(axis=(0, 2, 3), dtype=np.float64), rtol=1e-6)
    np.testing.assert_allclose(norm["targets"]["mean"], y.mean(axis=(0, 2, 3), dtype=np.float64), rtol=1e-6)
    np.testing.assert_allclose(norm["targets"]["std"], y.std(axis=(0, 2, 3), dtype=np.float64), rtol=1e-6)
    with pytest.raises(ValueError, match="chunk 3 out of range"):
        ds.read_chunk(3)
    with pytest.raises(ValueError, match=r"\[5, 11\)"):
        ds.read(5, 11)


def test_codec_and_chunking_on_disk(tmp_path):
    x, y = _arrays()
    _write(str(tmp_path / "d"), x, y)
    arr = zarr.open_array(str(tmp_path / "d" / "inputs"), mode="r")
    assert arr.chunks == (4, 2, 6, 5) and arr.dtype == np.float32
    (codec,) = arr.compressors
    assert codec.cname.value == "lz4" and codec.clevel == 5
    assert sorted(os.listdir(tmp_path / "d" / "inputs" / "c")) == ["0", "1", "2"]


def test_writer_refuses_existing_store_unless_overwrite(url):
    x, y = _arrays()
    _write(url, x, y)
    with pytest.raises(ValueError, match="already exists") as e:
        _write(url, x[:5], y[:5])
    assert url in str(e.value)
    _write(url, x[:5], y[:5], overwrite=True)
    ds = FieldDataset(url)
    assert ds.num_samples == 5 and np.array_equal(ds.read(0, 5)[0], x[:5])


def test_writer_errors(tmp_path):
    url = str(tmp_path / "w")
    w = FieldDatasetWriter(url, 10, (2, 6, 5), (1, 6, 5), 4, "test", {}, BOUNDS)
    x, y = _arrays()
    with pytest.raises(ValueError, match=r"chunk 1 of 'inputs' has shape \(3, 2, 6, 5\); expected \(4, 2, 6, 5\)"):
        w.write_chunk(1, x[:3], y[:4])
    with pytest.raises(ValueError, match=r"chunk 2 of 'targets' has shape"):
        w.write_chunk(2, x[8:], y[:2, :, :5])
    with pytest.raises(ValueError, match="chunk 3 out of range"):
        w.write_chunk(3, x[:2], y[:2])
    bad = x[:4].copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="chunk 0 of 'inputs' contains non-finite"):
        w.write_chunk(0, bad, y[:4])
    w.write_chunk(0, x[:4], y[:4])
    with pytest.raises(ValueError, match=r"2 chunk\(s\) never written: \[1, 2\]"):
        w.finish()
    # An unfinished dataset has no normalization and must not open.
    with pytest.raises(ValueError, match="normalization"):
        FieldDataset(url)
    with pytest.raises(ValueError, match="unknown codec 'lz5'"):
        FieldDatasetWriter(str(tmp_path / "c"), 10, (1, 4, 4), (1, 4, 4), 4, "t", {}, BOUNDS, codec="lz5")
    with pytest.raises(ValueError, match="grid_bounds"):
        FieldDatasetWriter(str(tmp_path / "b"), 10, (1, 4, 4), (1, 4, 4), 4, "t", {}, [[0, 1]])
    assert not (tmp_path / "c").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("kind", ["plain", "file", "memory"])
def test_missing_store_names_url_and_creates_nothing(tmp_path, kind):
    path = tmp_path / "nope" / "ds.zarr"
    url = {"plain": str(path), "file": f"file://{path}", "memory": _memory_url()}[kind]
    with pytest.raises(ValueError, match="not a Zarr v3 group") as e:
        FieldDataset(url)
    assert url in str(e.value)
    assert not (tmp_path / "nope").exists()


def test_not_a_group(tmp_path):
    url = str(tmp_path / "arr")
    zarr.create_array(open_zarr_store(url, read_only=False), shape=(4,), dtype="float32")
    with pytest.raises(ValueError, match="not a Zarr v3 group") as e:
        FieldDataset(url)
    assert url in str(e.value)


def _group_with(url, **arrays):
    g = zarr.open_group(open_zarr_store(url, read_only=False), mode="w", zarr_format=3)
    for name, (shape, chunks, dtype) in arrays.items():
        g.create_array(name, shape=shape, chunks=chunks, dtype=dtype)
    return g


def test_missing_array_lists_present(tmp_path):
    url = str(tmp_path / "g")
    _group_with(url, inputs=((8, 1, 4, 4), (4, 1, 4, 4), "float32"), other=((3,), (3,), "float32"))
    with pytest.raises(ValueError, match=r"missing array 'targets'; arrays present: \['inputs', 'other'\]") as e:
        FieldDataset(url)
    assert url in str(e.value)


@pytest.mark.parametrize("targets, message", [
    (((6, 1, 4, 4), (4, 1, 4, 4), "float32"), r"'inputs' has 8 samples but 'targets' has 6"),
    (((8, 1, 4, 4), (2, 1, 4, 4), "float32"), r"chunk length along N differs: 'inputs' 4, 'targets' 2"),
    (((8, 1, 4, 4), (4, 1, 4, 4), "int32"), r"array 'targets' has dtype int32"),
    (((8, 16), (4, 16), "float32"), r"array 'targets' has ndim 2"),
    (((8, 1, 4, 4), (4, 1, 2, 4), "float32"), r"array 'targets' has chunks \(4, 1, 2, 4\)"),
])
def test_array_validation(tmp_path, targets, message):
    url = str(tmp_path / "g")
    _group_with(url, inputs=((8, 1, 4, 4), (4, 1, 4, 4), "float32"), targets=targets)
    with pytest.raises(ValueError, match=message) as e:
        FieldDataset(url)
    assert url in str(e.value)


def test_missing_attributes(tmp_path):
    url = str(tmp_path / "g")
    g = _group_with(url, inputs=((8, 1, 4, 4), (4, 1, 4, 4), "float32"),
                    targets=((8, 1, 4, 4), (4, 1, 4, 4), "float32"))
    g.attrs.update({"fieldtrain_version": 1, "generator": "x", "params": {}})
    with pytest.raises(ValueError, match=r"missing keys \['grid', 'num_samples', 'normalization'\]"):
        FieldDataset(url)
    g.attrs.update({"grid": {}, "num_samples": 8,
                    "normalization": {"inputs": {"mean": [0.0], "std": [1.0]}, "targets": {"mean": [0.0]}}})
    with pytest.raises(ValueError, match=r"normalization\['targets'\] must hold 'mean' and 'std' with 1"):
        FieldDataset(url)


def test_missing_chunk_raises(tmp_path):
    url = str(tmp_path / "d")
    x, y = _arrays()
    _write(url, x, y)
    os.remove(tmp_path / "d" / "targets" / "c" / "1" / "0" / "0" / "0")
    ds = FieldDataset(url)  # metadata is fine; the chunk is checked when read
    assert np.array_equal(ds.read_chunk(0)[1], y[:4])
    with pytest.raises(ValueError, match=r"chunk 1 of array 'targets' is missing \(key 'targets/c/1/0/0/0'\)") as e:
        ds.read(2, 6)
    assert url in str(e.value)


def test_missing_chunk_memory():
    url = _memory_url()
    x, y = _arrays()
    _write(url, x, y)
    store = open_zarr_store(url, read_only=False)
    store.fs.sync_fs.rm(f"{store.path}/inputs/c/2/0/0/0")
    with pytest.raises(ValueError, match=r"chunk 2 of array 'inputs' is missing"):
        FieldDataset(url).read_chunk(2)


@pytest.mark.parametrize("codec", ["blosc-lz4", "none"])
def test_corrupt_chunk_raises(tmp_path, codec):
    url = str(tmp_path / "d")
    x, y = _arrays()
    _write(url, x, y, codec=codec)
    (tmp_path / "d" / "inputs" / "c" / "1" / "0" / "0" / "0").write_bytes(b"\x00garbage" * 3)
    ds = FieldDataset(url)
    with pytest.raises(ValueError, match=r"chunk 1 of array 'inputs' is corrupt") as e:
        ds.read(0, 10)
    assert url in str(e.value)
    assert np.array_equal(ds.read_chunk(2)[0], x[8:])


def test_all_zero_chunk_is_stored(tmp_path):
    # zarr skips chunks equal to the fill value by default; ours must still exist on disk.
    url = str(tmp_path / "z")
    x, y = np.zeros((4, 1, 3, 3), np.float32), np.zeros((4, 1, 3, 3), np.float32)
    _write(url, x, y, chunk_size=2)
    ds = FieldDataset(url)
    assert np.array_equal(ds.read(0, 4)[0], x)
    assert ds.normalization()["inputs"] == {"mean": [0.0], "std": [0.0]}
