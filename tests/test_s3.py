"""Data on an object store: a real S3 endpoint on loopback (moto's server), through s3fs and fsspec."""

import json
import os

import numpy as np
import pytest

from conftest import REPO, SMALL_MODEL, fieldtrain
from data.store import FieldDataset, write_field_dataset


def test_round_trip_and_errors_through_s3(s3_server):
    url = f"s3://{s3_server['bucket']}/roundtrip.zarr"
    rng = np.random.default_rng(0)
    x, y = rng.random((40, 2, 8, 8), dtype=np.float32), rng.random((40, 1, 8, 8), dtype=np.float32)
    write_field_dataset(url, x, y, chunk_size=16, generator="test", params={}, grid_bounds=[[0, 1], [0, 1]],
                        storage_options=s3_server["storage_options"])
    ds = FieldDataset(url, s3_server["storage_options"])
    got_x, got_y = ds.read(0, 40)
    assert np.array_equal(got_x, x) and np.array_equal(got_y, y) and ds.num_chunks == 3
    with pytest.raises(ValueError, match="missing.zarr"):
        FieldDataset(f"s3://{s3_server['bucket']}/missing.zarr", s3_server["storage_options"])


@pytest.mark.slow
def test_generate_shard_and_train_through_s3_without_leaking_credentials(s3_server, tmp_path):
    from data.generate import generate_dataset
    url = f"s3://{s3_server['bucket']}/darcy.zarr"
    report = generate_dataset("darcy", url, n=96, res=17, chunk_size=16, params={"fine_factor": 2},
                              storage_options=s3_server["storage_options"], progress=False)
    assert report["written"] == 6
    # Credentials from the environment, endpoint from the options: nothing secret on the command line.
    env_creds = {"AWS_ACCESS_KEY_ID": s3_server["key"], "AWS_SECRET_ACCESS_KEY": s3_server["secret"]}
    os.environ.update(env_creds)
    try:
        options = f'data.storage_options={{client_kwargs={{endpoint_url="{s3_server["endpoint"]}"}}}}'
        r = fieldtrain("train", str(REPO / "configs" / "darcy_fno.toml"), "--nproc", "2",
                       "--set", f"data.path={url}", "--set", options, "--set", f"run.out_dir={tmp_path}",
                       "--set", "run.name=s3", "--set", "train.max_steps=12", "--set", "comm.compressor=int8",
                       *[a for o in SMALL_MODEL for a in ("--set", o)])
    finally:
        for k in env_creds:
            os.environ.pop(k)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "s3" / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["replica_max_abs_diff"] == 0.0
    # Credentials given in the options instead are redacted from everything the run writes.
    r2 = fieldtrain("train", str(REPO / "configs" / "darcy_fno.toml"),
                    "--set", f"data.path={url}", "--set", f"run.out_dir={tmp_path}", "--set", "run.name=s3opts",
                    "--set", "train.max_steps=2",
                    "--set", (f'data.storage_options={{key="{s3_server["key"]}", secret="{s3_server["secret"]}", '
                              f'client_kwargs={{endpoint_url="{s3_server["endpoint"]}"}}}}'),
                    *[a for o in SMALL_MODEL for a in ("--set", o)])
    assert r2.returncode == 0, r2.stderr[-3000:]
    saved = json.loads((tmp_path / "s3opts" / "config.json").read_text())["data"]["storage_options"]
    assert saved["secret"] == "<redacted>" and saved["key"] == "<redacted>"
    for out in (r.stdout + r.stderr, r2.stdout + r2.stderr):
        assert s3_server["secret"] not in out
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert s3_server["secret"].encode() not in path.read_bytes(), path
