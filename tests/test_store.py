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
    codec, checksum = arr.compressors  # the compressor, then a CRC32C of the compressed bytes
    assert codec.cname.value == "lz4" and codec.clevel == 5
    assert isinstance(checksum, zarr.codecs.Crc32cCodec) and FieldDataset(str(tmp_path / "d")).checksummed
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
    # An unfinished dataset has no normalization and must not open; the error says how far it got.
    with pytest.raises(ValueError, match=r"unfinished, 1 of 3 chunks complete .*'normalization'.*finish\(\)"):
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


# A generation that stopped early (data/generate.py keeps progress markers until finish()).

@pytest.mark.parametrize("problem, res, params", [
    ("darcy", 9, {"fine_factor": 2, "tau": 4.0}),
    ("burgers", 32, {"fine_factor": 2, "T": 0.1, "nu": 0.05}),
    ("navier_stokes", 16, {"fine_factor": 1, "T": 0.01, "dt": 1e-3, "record_steps": 2, "forcing": False}),
])
def test_unfinished_generation_names_progress_and_the_command_that_resumes_it(problem, res, params):
    import shlex

    from data.generate import generate_dataset
    from launch.cli import main
    whole, staged = _memory_url(), _memory_url()
    kw = dict(n=20, res=res, seed=5, chunk_size=6, params=params, progress=False)
    generate_dataset(problem, whole, **kw)
    generate_dataset(problem, staged, **kw, max_chunks=2)
    with pytest.raises(ValueError, match=r"dataset generation is unfinished, 2 of 4 chunks complete") as e:
        FieldDataset(staged)
    assert str(e.value).startswith(f"{staged}: ") and "'normalization'" in str(e.value)
    command = str(e.value).split("resume it with: ")[1]
    assert command.startswith(f"fieldtrain data generate {problem} --n 20 --res {res} --out {staged} --seed 5 "
                              "--chunk-size 6 --param ")
    assert main(shlex.split(command)[1:]) == 0              # memory:// stores are generated in this process
    ds, ref = FieldDataset(staged), FieldDataset(whole)
    assert ds.attrs == ref.attrs and ds.verify() == []
    for a, b in zip(ds.read(0, 20), ref.read(0, 20)):
        assert np.array_equal(a, b)


def test_unfinished_store_of_another_writer_says_so(tmp_path):
    url = str(tmp_path / "w")
    w = FieldDatasetWriter(url, 10, (2, 6, 5), (1, 6, 5), 4, "test", {}, BOUNDS)
    with pytest.raises(ValueError, match=r"unfinished, 0 of 3 chunks complete.*stopped before "
                                         r"FieldDatasetWriter.finish\(\)") as e:
        FieldDataset(url)
    assert url in str(e.value)
    x, y = _arrays()
    for c in range(3):
        w.write_chunk(c, x[4 * c:4 * c + 4], y[4 * c:4 * c + 4])
    w.finish()
    assert FieldDataset(url).num_chunks == 3


@pytest.mark.slow
def test_printed_resume_command_run_as_is_finishes_the_store(tmp_path):
    import shlex

    from conftest import fieldtrain
    from conftest import REPO
    from data.generate import generate_dataset
    from trainer.config import load_config
    from trainer.train import check_inputs  # how training opens and validates its store
    whole, staged = str(tmp_path / "whole.zarr"), str(tmp_path / "staged zarr")   # a space: the command quotes it
    kw = dict(n=40, res=9, chunk_size=8, params={"fine_factor": 2, "alpha": 2.5}, progress=False, workers=1)
    generate_dataset("darcy", whole, **kw)
    generate_dataset("darcy", staged, **kw, max_chunks=3)
    cfg = load_config(REPO / "configs" / "darcy_fno.toml", [f"data.path={staged}", "data.batch_size=4"])
    with pytest.raises(ValueError, match="3 of 5 chunks complete") as e:
        check_inputs(cfg, world_size=1)
    argv = shlex.split(str(e.value).split("resume it with: ")[1])
    assert argv[:3] == ["fieldtrain", "data", "generate"] and argv[argv.index("--out") + 1] == staged
    r = fieldtrain(*argv[1:])                                # as printed: Ray tasks, no extra flags
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 written now, 3 already complete" in r.stdout
    ds, _ = check_inputs(cfg, world_size=1)
    ref = FieldDataset(whole)
    assert ds.checksummed and ds.attrs == ref.attrs and ds.verify() == []
    for a, b in zip(ds.read(0, 40), ref.read(0, 40)):
        assert np.array_equal(a, b)


# `fieldtrain data generate --workers N`, as the README's first command line uses it.

def _readme_generate_line() -> list[str]:
    import shlex

    from conftest import REPO
    (line,) = [ln for ln in (REPO / "README.md").read_text().splitlines()
               if ln.startswith("fieldtrain data generate") and "--workers" in ln]
    return shlex.split(line)


@pytest.mark.slow
def test_documented_generate_command_line_parses_and_runs(tmp_path):
    from conftest import fieldtrain
    from data.generate import generate_dataset
    from launch.cli import build_parser
    argv = _readme_generate_line()
    args = build_parser().parse_args(argv[1:])
    assert (args.problem, args.workers) == ("darcy", 2) and args.func.__name__ == "cmd_generate"
    # The same command line, made small: --workers 2 runs at most 2 Ray tasks at once, same arrays as 1 worker.
    small = argv[1:]
    small[small.index("--n") + 1], small[small.index("--res") + 1] = "24", "9"
    small[small.index("--out") + 1] = str(tmp_path / "ray.zarr")
    r = fieldtrain(*small, "--chunk-size", "8", "--param", "fine_factor=2", "--task-cpus", "0.25")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3 chunks, 3 written now" in r.stdout
    local = str(tmp_path / "local.zarr")
    generate_dataset("darcy", local, n=24, res=9, chunk_size=8, params={"fine_factor": 2}, progress=False, workers=1)
    for a, b in zip(FieldDataset(str(tmp_path / "ray.zarr")).read(0, 24), FieldDataset(local).read(0, 24)):
        assert np.array_equal(a, b)


def test_generate_workers_is_checked(tmp_path):
    from conftest import fieldtrain
    from data.generate import generate_dataset
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        generate_dataset("darcy", str(tmp_path / "a"), n=4, res=9, workers=0)
    with pytest.raises(ValueError, match=r"memory:// store lives in this process.*--workers 1"):
        generate_dataset("darcy", _memory_url(), n=4, res=9, workers=2)
    r = fieldtrain("data", "generate", "darcy", "--n", "4", "--res", "9", "--out", str(tmp_path / "b"),
                   "--workers", "0")
    assert r.returncode == 2 and "workers must be an integer >= 1" in r.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
