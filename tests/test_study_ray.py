"""The study's Ray backend (launch/study_ray.py) on a real loopback Ray cluster (test_ray_train.py's fixture): each
cell one Ray Train job, its record as the local backend's, a failing cell a failed record naming its error, and the
placement check's capacity."""

import json

import pytest

from conftest import REPO
from test_ray_train import ray_cluster  # noqa: F401  (the module-scoped cluster fixture)
from test_study import write_study


@pytest.fixture
def cluster_env(ray_cluster, monkeypatch):  # noqa: F811
    """The cluster's address, with this process's environment as the fixture's drivers get it (token auth...), so the
    drivers run_cell_ray starts can join."""
    address, env = ray_cluster
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(REPO)        # `python -m launch.cli`, as the study runs it
    return address


@pytest.mark.slow
def test_each_cell_is_a_ray_train_job_and_a_failing_one_is_recorded(cluster_env, small_darcy, tmp_path):
    from launch.study import Cell, load_study, read_records, run_study, write_csv
    from launch.study_ray import ray_capacity, run_cell_ray
    address = cluster_env
    assert ray_capacity(address) == (8, "0.5 CPU per worker on the Ray cluster's 1 node(s), 4 CPUs")   # --num-cpus=4

    path = write_study(tmp_path / "s.toml", small_darcy, "world_size = [1, 2]", steps=3)
    with pytest.raises(ValueError, match="study cell world_size=16: 16 ranks; the ray backend places at most 8"):
        run_study(write_study(tmp_path / "big.toml", small_darcy, "world_size = [16]"), "ray", ray_address=address,
                  out=tmp_path / "big")
    run_study(path, "ray", ray_address=address, out=tmp_path / "study")      # the two cells, as the CLI runs them
    study = load_study(path, tmp_path / "study")
    missing = tmp_path / "missing.zarr"
    results = study.out / "results.jsonl"
    rec = run_cell_ray(study, Cell((("world_size", 1), ("data.path", str(missing)))), 0, address)
    with results.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    recs = read_records(results)
    write_csv(study.out, recs)

    one, two, bad = recs
    for x, w in ((one, 1), (two, 2)):
        log = (study.out / "cells" / f"world_size={w}__r0.log").read_text()
        assert x["status"] == "ok" and x["steps"] == 3 and x["world_size"] == w, (x, log[-3000:])
        assert "from Ray Train" in log
        assert x["link"] == "ray" and x["ray_address"] == address
        assert 0 < x["step_s_p10"] <= x["step_s_median"] <= x["step_s_p90"], x
        assert x["samples_per_s"] == pytest.approx(8 * w / x["step_s_median"])
        assert x["test_rel_l2"] > 0 and x["peak_memory_mb_per_rank"] > 0
        summary = json.loads((study.out / "cells" / f"world_size={w}__r0" / "summary.json").read_text())
        assert summary["world_size"] == w and summary["finished"]
    assert one["bytes_per_step"] == 0 and two["bytes_per_step"] > 0
    assert two["replicas_consistent"] is True and two["replica_max_abs_diff"] == 0.0
    assert bad["status"] == "failed" and bad["link"] == "ray", bad
    assert bad["error"].startswith("ray job exit ") and "missing.zarr" in bad["error"], bad
    assert "does not exist" in bad["error"] and "\x1b[" not in bad["error"], bad    # the error, as text
    csv_lines = (study.out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and all(",ray," in line for line in csv_lines[1:])


def test_an_unreachable_cluster_has_no_capacity():
    from launch.local import free_port
    from launch.study_ray import ray_capacity
    capacity, why = ray_capacity(f"127.0.0.1:{free_port()}")
    assert capacity is None and "no Ray cluster reachable" in why
