"""Generation fanned out per chunk (Ray tasks, or in-process for memory://), resumable after interruption."""

import numpy as np
import pytest

from conftest import fieldtrain
from data.generate import generate_dataset
from data.store import FieldDataset


def _arrays(url):
    ds = FieldDataset(url)
    return ds.read(0, ds.num_samples), ds.attrs


@pytest.mark.parametrize("problem, res, params", [
    ("burgers", 32, {"fine_factor": 2, "T": 0.1}),
    ("navier_stokes", 16, {"fine_factor": 1, "T": 0.01, "dt": 1e-3, "record_steps": 2}),
    ("darcy", 9, {"fine_factor": 2}),
])
def test_interrupted_generation_resumes_to_the_same_arrays(problem, res, params):
    whole, staged = f"memory://gen-{problem}-whole", f"memory://gen-{problem}-staged"
    generate_dataset(problem, whole, n=20, res=res, chunk_size=6, params=params, progress=False)
    first = generate_dataset(problem, staged, n=20, res=res, chunk_size=6, params=params, progress=False, max_chunks=2)
    assert first == {**first, "written": 2, "skipped": 0}
    with pytest.raises(ValueError, match="normalization"):
        FieldDataset(staged)                       # an unfinished dataset does not open for training
    second = generate_dataset(problem, staged, n=20, res=res, chunk_size=6, params=params, progress=False)
    assert second["written"] == 2 and second["skipped"] == 2
    (x1, y1), a1 = _arrays(whole)
    (x2, y2), a2 = _arrays(staged)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and a1 == a2
    again = generate_dataset(problem, staged, n=20, res=res, chunk_size=6, params=params, progress=False)
    assert again["written"] == 0                     # complete: nothing to do
    with pytest.raises(ValueError, match="already holds"):
        generate_dataset(problem, staged, n=24, res=res, chunk_size=6, params=params, progress=False)


@pytest.mark.slow
def test_cli_generates_with_ray_tasks_resumes_and_inspects(tmp_path):
    whole, staged = tmp_path / "whole.zarr", tmp_path / "staged.zarr"
    args = ["--n", "40", "--res", "9", "--chunk-size", "8", "--param", "fine_factor=2", "--task-cpus", "0.25"]
    r = fieldtrain("data", "generate", "darcy", *args, "--out", str(whole))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "5 written now" in r.stdout
    generate_dataset("darcy", str(staged), n=40, res=9, chunk_size=8, params={"fine_factor": 2}, progress=False,
                     max_chunks=3, task_cpus=0.25)
    r = fieldtrain("data", "generate", "darcy", *args, "--out", str(staged))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 written now, 3 already complete" in r.stdout
    (x1, y1), _ = _arrays(str(whole))
    (x2, y2), _ = _arrays(str(staged))
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    r = fieldtrain("data", "inspect", str(staged))
    assert r.returncode == 0 and "inputs: shape (40, 1, 9, 9)" in r.stdout and "normalization" in r.stdout


def test_unknown_generator_and_parameter_are_named():
    with pytest.raises(ValueError, match="heat"):
        generate_dataset("heat", "memory://x", n=4, res=8)
    with pytest.raises(ValueError, match="bogus"):
        generate_dataset("burgers", "memory://y", n=4, res=8, params={"bogus": 1})
