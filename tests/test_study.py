"""`fieldtrain study`: a grid of runs on the local backend (loopback), its records, --resume and bad input."""

import json

import pytest

from conftest import REPO, SMALL_MODEL, fieldtrain


def write_study(path, small_darcy, axes: str, steps: int = 4, extra: str = "") -> str:
    sets = ", ".join(json.dumps(s) for s in [*SMALL_MODEL, f"data.path={small_darcy}", "train.ckpt_every=0"])
    path.write_text(f'[study]\nconfig = "{REPO / "configs" / "darcy_fno.toml"}"\nsteps = {steps}\nrepeats = 1\n'
                    f"warmup_steps = 1\nset = [{sets}]\n{extra}\n[axes]\n{axes}\n")
    return str(path)


def records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_study_runs_every_cell_records_them_and_resume_runs_nothing(small_darcy, tmp_path):
    study = write_study(tmp_path / "s.toml", small_darcy,
                        'world_size = [1, 2, 4]\n"comm.compressor" = ["none", "int8"]')
    out = tmp_path / "study"
    r = fieldtrain("study", study, "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = records(out)
    assert sorted(x["cell"] for x in recs) == sorted(
        f'world_size={w},comm.compressor="{c}"' for w in (1, 2, 4) for c in ("none", "int8"))
    for x in recs:
        assert x["status"] == "ok" and x["steps"] == 4, x
        assert 0 < x["step_s_p10"] <= x["step_s_median"] <= x["step_s_p90"], x
        assert x["samples_per_s"] == pytest.approx(8 * x["world_size"] / x["step_s_median"])
        assert x["test_rel_l2"] > 0 and x["peak_memory_mb_per_rank"] > 0
        assert x["link"] == "loopback (one node)" and x["cores_per_rank"] > 0 and x["nodes"] == 1
    two = {x["axes"]["comm.compressor"]: x for x in recs if x["world_size"] == 2}
    assert two["none"]["replicas_consistent"] and two["int8"]["replicas_consistent"]
    assert two["int8"]["bytes_per_step"] < two["none"]["bytes_per_step"]
    # the cost model's collectives (the compressors' own `collectives`) against the transport's own byte counters at
    # W = 2 and 4: exact for fp32; int8 pads each shard to whole 256-value blocks (256 code bytes and a 4-byte scale
    # each), which its cost model leaves out: the all-to-all sends W - 1 shards and the all-gather this rank's shard to
    # W - 1 ranks, each less than one block of padding: < 2 (W - 1) 260 bytes (measured +1% on this 34,000-float model)
    from launch.study_model import fit
    model = fit(recs)
    checked = {(s.split("=")[-1], w): (counted, predicted) for s, w, counted, predicted in model.bytes_check}
    assert sorted(checked) == [("int8", 2), ("int8", 4), ("none", 2), ("none", 4)], checked
    # int8's allgather carries this rank's reduced shard: 1/W of the gradient, so the records carry it at every span
    two_int8 = two["int8"]["collectives_at"]
    gather = {w: dict(map(tuple, two_int8[str(w)]))["allgather"] for w in (2, 1024)}
    assert gather[1024] == pytest.approx(gather[2] * 2 / 1024, rel=0.05)
    for (name, w), (counted, predicted) in checked.items():
        if name == "none":
            assert counted == predicted, (w, counted, predicted)
        else:
            assert 0 <= counted - predicted < 2 * (w - 1) * 260, (w, counted, predicted)
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 7 and csv_lines[0].startswith("cell,repeat,status")
    for png in ("scaling.png", "error_vs_bytes.png", "memory.png", "prediction.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    report = (out / "report.md").read_text()
    assert "![scaling](scaling.png)" in report and report.count("| 1 of 1 |") == 6 and "identical" in report
    assert "## Cost model" in report and "held-out error" in report

    again = fieldtrain("study", study, "--out", str(out), "--resume")
    assert again.returncode == 0 and "6 cells x 1 repeats, 0 to run" in again.stderr, again.stderr[-2000:]
    assert len(records(out)) == 6
    (out / "report.md").unlink()
    (out / "scaling.png").unlink()
    redo = fieldtrain("study", "report", str(out))        # outputs again from results.jsonl, nothing run
    assert redo.returncode == 0 and (out / "scaling.png").is_file(), redo.stderr[-2000:]
    assert (out / "report.md").read_text() == report
    refused = fieldtrain("study", study, "--out", str(out))       # neither --resume nor --force
    assert refused.returncode == 2 and "--resume" in refused.stderr


@pytest.mark.slow
def test_a_failing_cell_is_recorded_and_the_study_goes_on(small_darcy, tmp_path):
    study = write_study(tmp_path / "s.toml", small_darcy,
                        f'"data.path" = ["{tmp_path / "missing.zarr"}", "{small_darcy}"]', steps=2)
    out = tmp_path / "study"
    r = fieldtrain("study", study, "--out", str(out), timeout=300)
    assert r.returncode == 1
    failed, ok = sorted(records(out), key=lambda x: x["status"])
    assert failed["status"] == "failed" and "missing.zarr" in failed["error"], failed
    assert ok["status"] == "ok"


def test_bad_cells_are_refused_before_anything_runs(small_darcy, tmp_path):
    from launch.study import run_study
    out = tmp_path / "study"
    study = write_study(tmp_path / "a.toml", small_darcy, '"comm.compressor" = ["none", "gzip"]')
    with pytest.raises(ValueError, match=r'study cell comm.compressor="gzip": .*comm.compressor'):
        run_study(study, out=out)
    study = write_study(tmp_path / "b.toml", small_darcy, '"model.fno.widht" = [8]')
    with pytest.raises(ValueError, match=r"study cell model.fno.widht=8: unknown config key 'model.fno.widht'"):
        run_study(study, out=out)
    study = write_study(tmp_path / "c.toml", small_darcy, "world_size = [1, 4096]")
    with pytest.raises(ValueError, match=r"study cell world_size=4096: 4096 ranks; the local backend places at most"):
        run_study(study, out=out)
    assert not out.exists()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['study.stepz'\]"):
        run_study(write_study(tmp_path / "d.toml", small_darcy, "world_size = [1]", extra="stepz = 3"), out=out)
    with pytest.raises(ValueError, match="study backend 'mesos'"):
        run_study(write_study(tmp_path / "e.toml", small_darcy, "world_size = [1]"), backend="mesos", out=out)
    with pytest.raises(ValueError, match="study backend ray: --ray-address"):
        run_study(write_study(tmp_path / "e.toml", small_darcy, "world_size = [1]"), backend="ray", out=out)
    # the placement axes: ranks that do not split over the nodes, a bandwidth tc cannot take, a link on Slurm
    with pytest.raises(ValueError, match=r"study cell world_size=3,nodes=2: 3 ranks do not split evenly over 2 nodes"):
        run_study(write_study(tmp_path / "f.toml", small_darcy, "world_size = [3]\nnodes = [2]"), out=out)
    with pytest.raises(ValueError, match=r"axes.bandwidth: bandwidth '1 gig': expected a positive tc rate"):
        run_study(write_study(tmp_path / "g.toml", small_darcy, 'nodes = [2]\nbandwidth = ["1 gig"]'), out=out)
    with pytest.raises(ValueError, match=r"axes.bandwidth is the local backend's emulated link"):
        run_study(write_study(tmp_path / "h.toml", small_darcy, 'world_size = [1]\nbandwidth = ["1gbit"]'),
                  backend="slurm", out=out)
    assert not out.exists()


def test_a_directory_of_another_study_is_refused_unless_forced(small_darcy, tmp_path):
    from launch.study import _claim, load_study
    out = tmp_path / "study"
    first = load_study(write_study(tmp_path / "a.toml", small_darcy, "world_size = [1]"), out)
    _claim(first, resume=False, force=False)
    (out / "results.jsonl").write_text('{"cell": "world_size=1", "repeat": 0, "status": "ok"}\n')
    other = load_study(write_study(tmp_path / "b.toml", small_darcy, "world_size = [2]"), out)
    with pytest.raises(ValueError, match="holds another study"):
        _claim(other, resume=True, force=False)
    _claim(other, resume=False, force=True)                # starts over: the old records are gone
    assert not (out / "results.jsonl").exists()
    assert json.loads((out / "study.json").read_text())["fingerprint"] == other.fingerprint


N = 2_367_008                    # floats in the gradient
OPS = {"none": [("allreduce", 4.0 * N)],                                   # the compressors' and engines' collectives
       "topk": [("allgather", 8.0 * N // 100)],                            # sparse: grows with W
       "powersgd": [("allreduce", 1.2e5), ("allreduce", 2.1e5)],
       "fsdp2": [("reduce_scatter", 4.0 * N), ("param_allgather", 4.0 * N), ("param_allgather", 4.0 * N)]}


def _synthetic(alpha, kappa, compute, worlds, bandwidths=("100mbit", "1gbit"), beta_local=0.0, codec=None):
    """Records timed by the model itself: W = 1 on loopback, W > 1 on W emulated nodes at each bandwidth."""
    from launch.study_model import messages, parse_rate, wire_bytes
    recs = []
    for series, c in compute.items():
        for w in worlds:
            for bw in (bandwidths if w > 1 else [None]):
                beta = kappa * 8 / parse_rate(bw) if bw else beta_local
                ops = OPS[series] if w > 1 else []
                t = c + sum(alpha * messages(k, w) + beta * wire_bytes(k, p, w) for k, p in ops)
                t += (codec or {}).get(series, 0.0) if w > 1 else 0.0
                b = sum(wire_bytes(k, p, w) for k, p in ops if k != "param_allgather")
                recs.append({"status": "ok", "world_size": w, "nodes": w, "bandwidth": bw, "cores_per_rank": 1.0,
                             "axes": {"world_size": w, "comm.compressor": series, **({"bandwidth": bw} if bw else {})},
                             "step_s_median": t, "bytes_per_step": b, "collectives": [list(o) for o in ops]})
    return recs


def test_cost_model_recovers_alpha_and_beta_from_synthetic_timings():
    from launch.study_model import crossover_bps, fit
    alpha, kappa = 3e-5, 1.25            # 30 us per message; the wire 1.25x slower than its nominal rate
    compute = {"none": 0.2, "topk": 0.22, "powersgd": 0.23, "fsdp2": 0.21}
    codec = {"topk": 0.011, "powersgd": 0.006}                              # each series' own encode/decode seconds
    model = fit(_synthetic(alpha, kappa, compute, [1, 2, 4], codec=codec))
    assert model.alpha == pytest.approx(alpha, rel=1e-6) and model.kappa == pytest.approx(kappa, rel=1e-6)
    assert {s.split("=")[1]: round(e, 9) for s, e in model.codec.items()} == {**codec, "none": 0, "fsdp2": 0}
    assert model.held_out_error == pytest.approx(0, abs=1e-9) and model.caveats == []
    assert all(counted == pytest.approx(predicted) for _, _, counted, predicted in model.bytes_check)
    # 512 nodes at 100 Gbit/s: PowerSGD's two allreduces; top-k's allgather sends 511 x its payload
    assert model.predict("comm.compressor=powersgd", 512, bandwidth_bps=100e9) == pytest.approx(
        0.23 + 0.006 + alpha * 2 * 2 * 511 + kappa * 8 / 100e9 * 3.3e5 * 2 * 511 / 512)
    assert model.predict("comm.compressor=topk", 512, 100e9, compute_s=0.01) == pytest.approx(
        0.01 + 0.011 + alpha * 511 + kappa * 8 / 100e9 * 511 * 8 * (N // 100))
    assert model.predict("comm.compressor=fsdp2", 64, 1e9) == pytest.approx(
        0.21 + alpha * 3 * 63 + kappa * 8 / 1e9 * 3 * 63 / 64 * 4 * N)
    # where compression pays: PowerSGD beats fp32 below the crossover, never above
    b = crossover_bps(model, "comm.compressor=powersgd", "comm.compressor=none", 4)
    assert b is not None and model.predict("comm.compressor=powersgd", 4, b / 2) < model.predict(
        "comm.compressor=none", 4, b / 2)
    assert model.predict("comm.compressor=powersgd", 4, b * 2) >= model.predict("comm.compressor=none", 4, b * 2)


def test_cost_model_needs_a_world_of_one_and_predict_prints_a_table(tmp_path):
    from launch.study_model import fit
    recs = _synthetic(1e-4, 1.0, {"none": 0.3}, [2, 4])
    with pytest.raises(ValueError, match="world_size = 1"):
        fit(recs)
    recs = _synthetic(1e-4, 1.0, {"none": 0.3, "topk": 0.31}, [1, 2, 4], bandwidths=("100mbit",))
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    r = fieldtrain("study", "predict", str(tmp_path), "--nodes", "2,1024", "--bandwidth", "100mbit,100gbit")
    assert r.returncode == 0, r.stderr
    assert "alpha 100.0 us per message, kappa 1.00" in r.stdout and "held-out error 0.0%" in r.stdout
    assert "caveat:" not in r.stdout
    one_world = [x for x in recs if x["world_size"] < 4]
    assert any("one world size above 1" in c for c in fit(one_world).caveats)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("comm.compressor=none")]
    assert len(lines) == 4 and float(lines[0].split()[3]) == pytest.approx(0.3 + 1e-4 * 2 + 8e-8 * 4 * N, rel=1e-3)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "studies").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_study_file_checks(path):
    """Every cell of each shipped study builds a valid config (the README points at them)."""
    from launch.study import check_cells, load_study
    study = load_study(path)
    assert len(check_cells(study, "local")) == len(study.cells()) > 1


def _namespaces_work() -> bool:
    from launch import netns
    try:
        netns.check_available()
    except netns.NetnsUnavailable:
        return False
    probe = f"ftb{__import__('os').getpid()}-probe"
    made = __import__("subprocess").run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    netns.delete_namespaces([probe])
    return made


@pytest.mark.slow
def test_study_on_emulated_nodes_shapes_the_link_and_runs_one_node_once(small_darcy, tmp_path):
    """nodes x bandwidth on the local backend: 2 emulated nodes (namespaces, tbf) per shaped cell, the one-node cell
    run once for both bandwidths; a 10 Mbit/s link cannot carry the step's bytes faster than its rate."""
    if not _namespaces_work():
        pytest.skip("network namespaces need root and CAP_SYS_ADMIN (ip netns add failed)")
    from launch import netns
    study = write_study(tmp_path / "s.toml", small_darcy, 'nodes = [1, 2]\nbandwidth = ["10mbit", "1gbit"]')
    out = tmp_path / "study"
    before = set(netns.existing_namespaces())
    r = fieldtrain("study", study, "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = {(x["nodes"], x["bandwidth"]): x for x in records(out)}
    assert len(recs) == 4 and all(x["status"] == "ok" for x in recs.values())
    assert recs[(1, "1gbit")]["shared_from"] == "nodes=1,bandwidth=\"10mbit\""
    assert recs[(1, "1gbit")]["axes"] == {"nodes": 1, "bandwidth": "1gbit"}
    assert recs[(1, "1gbit")]["step_s_median"] == recs[(1, "10mbit")]["step_s_median"]
    slow = recs[(2, "10mbit")]
    assert slow["link"] == "10mbit between 2 emulated nodes (tbf)" and slow["world_size"] == 2
    assert slow["replicas_consistent"] and slow["bytes_per_step"] == recs[(2, "1gbit")]["bytes_per_step"] > 0
    # tbf passes at most its bucket (64 KiB, launch/netns.py tbf_args) at once, the rest at 10 Mbit/s
    assert slow["step_s_median"] >= (slow["bytes_per_step"] - 64 * 1024) * 8 / 10e6
    left = [ns for ns in set(netns.existing_namespaces()) - before if ns.startswith("ftb")]
    assert not left, left                  # every namespace the study made is deleted
    assert (out / "bandwidth.png").read_bytes()[:4] == b"\x89PNG"


def test_bundles_vary_keys_together_and_exposed_time_is_measured_against_the_skip_floor(small_darcy, tmp_path):
    """A bundle axis sets several keys per value, labelled by its name; a cell's exposed time is its step time less its
    skip floor's (same placement, same settings but comm.*)."""
    study = write_study(tmp_path / "s.toml", small_darcy, 'world_size = [2]\nexchange = ['
                        '{name = "floor", "comm.compressor" = "skip"}, '
                        '{name = "int8 ZeRO-2", "parallel.engine" = "deepspeed", "comm.compressor" = "int8"}, '
                        '{name = "int8", "comm.compressor" = "int8", "comm.int8.block_size" = 128}]', steps=3)
    out = tmp_path / "study"
    r = fieldtrain("study", study, "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = {x["axes"]["exchange"]: x for x in records(out)}
    assert recs["int8 ZeRO-2"]["cell"] == 'world_size=2,exchange="int8 ZeRO-2"'
    assert recs["int8 ZeRO-2"]["settings"] == {"parallel.engine": "deepspeed", "comm.compressor": "int8"}
    assert recs["int8"]["settings"]["comm.int8.block_size"] == 128 and recs["floor"]["bytes_per_step"] == 0
    rows = {row.split(",")[0]: row for row in (out / "results.csv").read_text().splitlines()[1:]}
    import csv
    table = {x["cell"]: x for x in csv.DictReader((out / "results.csv").open())}
    int8 = table['world_size=2,exchange="int8"']
    assert float(int8["exposed_s"]) == pytest.approx(recs["int8"]["step_s_median"] - recs["floor"]["step_s_median"])
    assert table['world_size=2,exchange="int8 ZeRO-2"']["exposed_s"] == ""    # its engine's floor was not run
    assert rows and "exchange=int8 ZeRO-2" in (out / "report.md").read_text().replace('"', "")
    with pytest.raises(ValueError, match="a bundle .* needs a name"):
        from launch.study import load_study
        load_study(write_study(tmp_path / "b.toml", small_darcy, 'exchange = [{"comm.compressor" = "int8"}]'))


def test_strong_scaling_splits_the_global_batch_and_its_efficiency_is_the_speedup_per_rank(small_darcy, tmp_path):
    """study.global_batch keeps the global batch (data.batch_size = global_batch / W in each cell, refused where it does
    not split), and the report's efficiency is W0 t(W0) / (W t(W)): a perfect speed-up scores 1."""
    from launch.study import check_cells, load_study
    from launch.study_report import weak_scaling_table
    study = load_study(write_study(tmp_path / "s.toml", small_darcy, "world_size = [1, 2, 4]", extra="global_batch = 8"))
    cells = check_cells(study, "local")
    assert [study.overrides(c, tmp_path / "x")[-6] for c in cells] == [
        "data.batch_size=8", "data.batch_size=4", "data.batch_size=2"]
    with pytest.raises(ValueError, match="study cell world_size=3: study.global_batch = 8 does not split evenly"):
        check_cells(load_study(write_study(tmp_path / "b.toml", small_darcy, "world_size = [1, 3]",
                                           extra="global_batch = 8")), "local")
    recs = [{"status": "ok", "scaling": "strong", "world_size": w, "axes": {"world_size": w}, "step_s_median": t}
            for w, t in ((1, 0.8), (2, 0.4), (4, 0.4))]      # perfect to 2 ranks, no faster at 4
    rows = weak_scaling_table(recs)
    assert rows[1] == "## Strong scaling" and rows[-1] == "| all | W=2: 1.00; W=4: 0.50 |"
