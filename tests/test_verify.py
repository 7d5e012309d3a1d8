"""Chunk checksums: every changed byte of a chunk is an error naming the chunk; `fieldtrain data verify`;
stores written before checksums still open (with a warning) and verify still finds missing/undecodable chunks."""

import json
import logging
import os
import shlex
import uuid

import numpy as np
import pytest
import zarr

from conftest import fieldtrain
from data.store import FieldDataset, open_zarr_store, write_field_dataset

BOUNDS = [[0.0, 1.0], [0.0, 1.0]]


def _arrays(n=10, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 2, 6, 5)).astype(np.float32), rng.normal(size=(n, 1, 6, 5)).astype(np.float32))


def _write(url, x, y, codec="blosc-lz4", **kw):
    write_field_dataset(url, x, y, chunk_size=4, generator="test", params={"k": 1}, grid_bounds=BOUNDS, codec=codec,
                        **kw)


def _write_unprotected(url, x, y, attrs=None, compressors="blosc-lz4", chunk_size=4):
    """A store as fieldtrain wrote it before chunk checksums: blosc-lz4 (or no) compression, no crc32c."""
    attrs = attrs or {"fieldtrain_version": 1, "generator": "test", "params": {"k": 1},
                      "grid": {"shape": list(x.shape[2:]), "bounds": BOUNDS}, "num_samples": len(x)}
    norm = {name: {"mean": a.mean(axis=(0, 2, 3), dtype=np.float64).tolist(),
                   "std": a.std(axis=(0, 2, 3), dtype=np.float64).tolist()} for name, a in (("inputs", x), ("targets", y))}
    group = zarr.open_group(open_zarr_store(url, read_only=False), mode="w", zarr_format=3,
                            attributes={**attrs, "normalization": norm})
    codec = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle") if compressors == "blosc-lz4" else None
    for name, a in (("inputs", x), ("targets", y)):
        arr = group.create_array(name, shape=a.shape, dtype="float32", chunks=(chunk_size, *a.shape[1:]),
                                 compressors=codec, fill_value=np.nan, config={"write_empty_chunks": True})
        arr[:] = a


def _flip(path, pos, mask):
    data = bytearray(path.read_bytes())
    data[pos] ^= mask
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("codec", ["blosc-lz4", "none"])
def test_every_flipped_byte_is_named_by_read_read_chunks_and_verify(tmp_path, codec):
    url = str(tmp_path / "d.zarr")
    x, y = _arrays()
    _write(url, x, y, codec=codec)
    ds = FieldDataset(url)
    assert ds.checksummed
    assert isinstance(ds.inputs.compressors[-1], zarr.codecs.Crc32cCodec)
    chunk_file = tmp_path / "d.zarr" / "inputs" / "c" / "1" / "0" / "0" / "0"
    size = len(chunk_file.read_bytes())
    rng = np.random.default_rng(9)
    # 150 sampled positions, plus the first byte and the 4 bytes of the crc itself; a random non-zero xor mask.
    positions = sorted(set(rng.choice(size, size=min(150, size), replace=False).tolist()) | {0, *range(size - 4, size)})
    key = "inputs/c/1/0/0/0"
    for pos in positions:
        mask = int(rng.integers(1, 256))
        _flip(chunk_file, pos, mask)
        for read in (lambda: ds.read(2, 9), lambda: ds.read_chunks([0, 1, 2])):
            with pytest.raises(ValueError, match="checksum mismatch") as e:
                read()
            assert f"{url}: chunk 1 of array 'inputs' is corrupt: checksum mismatch (key {key!r}" in str(e.value), pos
        (bad,) = ds.verify()
        assert bad["array"] == "inputs" and bad["chunk"] == 1 and bad["key"] == key, (pos, bad)
        assert bad["error"].startswith("corrupt: checksum mismatch"), (pos, bad)
        _flip(chunk_file, pos, mask)                       # restore: everything reads again
    assert ds.verify() == []
    assert np.array_equal(ds.read(0, 10)[0], x)


def test_verify_lists_every_bad_chunk_and_checks_only_the_chunks_asked(tmp_path):
    url = str(tmp_path / "d.zarr")
    x, y = _arrays(n=16)
    _write(url, x, y)
    os.remove(tmp_path / "d.zarr" / "inputs" / "c" / "0" / "0" / "0" / "0")
    _flip(tmp_path / "d.zarr" / "targets" / "c" / "2" / "0" / "0" / "0", 3, 0x10)
    ds = FieldDataset(url)
    bad = ds.verify()
    assert [(b["array"], b["chunk"], b["key"]) for b in bad] == [("inputs", 0, "inputs/c/0/0/0/0"),
                                                                  ("targets", 2, "targets/c/2/0/0/0")]
    assert bad[0]["error"] == "missing" and bad[1]["error"].startswith("corrupt: checksum mismatch")
    assert ds.verify([1, 3]) == []                          # the Trainer's start-up check of a few chunks
    assert [b["chunk"] for b in ds.verify([3, 2])] == [2]
    with pytest.raises(ValueError, match="chunk 4 out of range"):
        ds.verify([4])


def test_memory_store_flip_is_detected():
    url = f"memory://fieldtrain-verify-{uuid.uuid4().hex}/d.zarr"
    x, y = _arrays()
    _write(url, x, y)
    store = open_zarr_store(url, read_only=False)
    path = f"{store.path}/targets/c/0/0/0/0"
    data = bytearray(store.fs.sync_fs.cat_file(path))
    data[len(data) // 2] ^= 0x01
    store.fs.sync_fs.pipe_file(path, bytes(data))
    ds = FieldDataset(url)
    with pytest.raises(ValueError, match=r"chunk 0 of array 'targets' is corrupt: checksum mismatch"):
        ds.read_chunk(0)
    assert [(b["array"], b["chunk"]) for b in ds.verify()] == [("targets", 0)]


def test_cli_verify_exit_codes_and_inspect(tmp_path):
    url = str(tmp_path / "d.zarr")
    x, y = _arrays(n=16)
    _write(url, x, y)
    r = fieldtrain("data", "verify", url)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "all 4 chunks of 'inputs' and 'targets' read back intact (crc32c-checked)" in r.stdout
    r = fieldtrain("data", "inspect", url)
    assert r.returncode == 0 and "checksummed: yes" in r.stdout

    _flip(tmp_path / "d.zarr" / "targets" / "c" / "3" / "0" / "0" / "0", 7, 0x80)
    os.remove(tmp_path / "d.zarr" / "inputs" / "c" / "1" / "0" / "0" / "0")
    r = fieldtrain("data", "verify", url)
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert f"{url}: 2 bad chunk(s):" in r.stdout
    assert "chunk 1 of array 'inputs' (key 'inputs/c/1/0/0/0'): missing" in r.stdout
    assert "chunk 3 of array 'targets' (key 'targets/c/3/0/0/0'): corrupt: checksum mismatch" in r.stdout

    r = fieldtrain("data", "verify", str(tmp_path / "nothing.zarr"))   # user error: ValueError -> 2
    assert r.returncode == 2 and "nothing.zarr" in r.stderr


def test_cli_verify_through_s3(s3_server):
    import s3fs
    url = f"s3://{s3_server['bucket']}/verify-{uuid.uuid4().hex}.zarr"
    x, y = _arrays()
    _write(url, x, y, storage_options=s3_server["storage_options"])
    options = json.dumps(s3_server["storage_options"])
    r = fieldtrain("data", "verify", url, "--storage-options", options)
    assert r.returncode == 0, r.stderr[-3000:]
    fs = s3fs.S3FileSystem(key=s3_server["key"], secret=s3_server["secret"], skip_instance_cache=True,
                           client_kwargs={"endpoint_url": s3_server["endpoint"]})
    path = f"{url[len('s3://'):]}/inputs/c/2/0/0/0"
    data = bytearray(fs.cat_file(path))
    data[-1] ^= 0x04                                          # a bit of the stored crc itself
    fs.pipe_file(path, bytes(data))
    r = fieldtrain("data", "verify", url, "--storage-options", options)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "chunk 2 of array 'inputs' (key 'inputs/c/2/0/0/0'): corrupt: checksum mismatch" in r.stdout
    assert s3_server["secret"] not in r.stdout + r.stderr


def test_store_without_checksums_opens_with_one_warning_and_verify_finds_damage(tmp_path, caplog):
    url = str(tmp_path / "old.zarr")
    x, y = _arrays(n=12)
    _write_unprotected(url, x, y, compressors=None)
    with caplog.at_level(logging.WARNING, logger="fieldtrain.data"):
        ds = FieldDataset(url)
        FieldDataset(url)                                     # once per store and process, not per open
    (record,) = [r for r in caplog.records if r.name == "fieldtrain.data"]
    assert record.levelno == logging.WARNING and "\n" not in record.getMessage()
    assert f"{url}: chunks carry no checksum" in record.getMessage() and "rewrite it" in record.getMessage()
    assert not ds.checksummed
    got_x, got_y = ds.read(0, 12)
    assert np.array_equal(got_x, x) and np.array_equal(got_y, y) and ds.verify() == []

    chunks = tmp_path / "old.zarr"
    os.remove(chunks / "targets" / "c" / "1" / "0" / "0" / "0")
    raw = chunks / "inputs" / "c" / "2" / "0" / "0" / "0"     # uncompressed: overwrite one value with a NaN
    data = bytearray(raw.read_bytes())
    data[0:4] = np.array([np.nan], dtype="<f4").tobytes()
    raw.write_bytes(bytes(data))
    bad = ds.verify()
    assert [(b["array"], b["chunk"], b["error"]) for b in bad] == [
        ("targets", 1, "missing"), ("inputs", 2, "corrupt: 1 non-finite value(s)")]
    r = fieldtrain("data", "inspect", url)
    assert r.returncode == 0 and "checksummed: NO" in r.stdout and "chunks carry no checksum" in r.stderr
    r = fieldtrain("data", "verify", url)
    assert r.returncode == 1 and "chunk 1 of array 'targets' (key 'targets/c/1/0/0/0'): missing" in r.stdout


def test_compressed_store_without_checksums_names_an_undecodable_chunk(tmp_path):
    url = str(tmp_path / "old.zarr")
    x, y = _arrays(n=12)
    _write_unprotected(url, x, y)
    (tmp_path / "old.zarr" / "inputs" / "c" / "1" / "0" / "0" / "0").write_bytes(b"\x00garbage" * 3)
    ds = FieldDataset(url)
    (bad,) = ds.verify()
    assert (bad["array"], bad["chunk"], bad["key"]) == ("inputs", 1, "inputs/c/1/0/0/0")
    assert bad["error"].startswith("corrupt: cannot be decoded")
    with pytest.raises(ValueError, match=r"chunk 1 of array 'inputs' is corrupt: cannot be decoded"):
        ds.read_chunks([1])


def test_generated_store_without_checksums_names_the_command_that_regenerates_it(tmp_path, caplog):
    from data.generate import generate_dataset
    new, old = str(tmp_path / "new.zarr"), str(tmp_path / "old.zarr")
    generate_dataset("darcy", new, n=10, res=9, chunk_size=4, params={"fine_factor": 2, "alpha": 2.5}, workers=1,
                     progress=False)
    fresh = FieldDataset(new)
    x, y = fresh.read(0, 10)
    attrs = {k: v for k, v in fresh.attrs.items() if k != "normalization"}
    _write_unprotected(old, x, y, attrs=attrs)
    with caplog.at_level(logging.WARNING, logger="fieldtrain.data"):
        assert not FieldDataset(old).checksummed
    message = caplog.records[-1].getMessage()
    command = message.split("to get one: ")[1]
    assert command == (f"fieldtrain data generate darcy --n 10 --res 9 --out {old} --seed 0 --chunk-size 4 "
                       "--param fine_factor=2 --param alpha=2.5 --overwrite")
    r = fieldtrain(*shlex.split(command)[1:], "--workers", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    again = FieldDataset(old)
    assert again.checksummed and again.attrs == fresh.attrs
    got_x, got_y = again.read(0, 10)
    assert np.array_equal(got_x, x) and np.array_equal(got_y, y)
