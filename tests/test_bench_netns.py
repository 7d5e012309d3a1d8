"""The namespace benchmark's pure parts: topology commands, row parsing, result arithmetic (no root, no namespaces)."""

import pytest

from bench import comm
from launch import netns


def test_parse_rate():
    assert netns.parse_rate("10gbit") == 10**10
    assert netns.parse_rate("100MBit") == 10**8
    assert netns.parse_rate("1.5gbit") == 1_500_000_000
    assert netns.parse_rate("unshaped") is None
    for bad in ("fast", "100", "100mbps", "0mbit", "-1gbit"):
        with pytest.raises(ValueError, match="bandwidth"):
            netns.parse_rate(bad)


def test_tbf_burst_has_a_floor():
    assert netns.tbf_args(10**8)[:4] == ["rate", "100000000bit", "burst", str(64 * 1024)]
    assert netns.tbf_args(10**10)[3] == str(10**10 // 8 * 2 // 1000)   # 2 ms at line rate


def _ifnames(cmds):
    names = set()
    for c in cmds:
        for key in ("add", "name", "dev"):
            if c[:1] == ["ip"] and key in c and "link" in c:
                names.add(c[c.index(key) + 1])
    return names


def test_two_nodes_one_veth_pair_no_bridge():
    topo = netns.Topology(2, 10**9, prefix="ftb123")
    cmds = topo.setup_commands()
    assert topo.namespaces == ["ftb123-n0", "ftb123-n1"] and topo.bridge_namespace is None
    assert not any("bridge" in c for c in cmds)
    veth = [c for c in cmds if "veth" in c]
    assert veth == [["ip", "link", "add", "eth0", "netns", "ftb123-n0", "type", "veth",
                     "peer", "name", "eth0", "netns", "ftb123-n1"]]
    assert sum(c[0] == "tc" for c in cmds) == 2
    assert ["ip", "-n", "ftb123-n1", "addr", "add", "198.18.0.2/24", "dev", "eth0"] in cmds
    assert all(len(n) <= 15 for n in _ifnames(cmds))


def test_bridge_for_more_nodes_shapes_both_ends():
    topo = netns.Topology(8, 10**8, prefix="ftb4194304")
    cmds = topo.setup_commands()
    assert topo.bridge_namespace == "ftb4194304-br" and len(topo.namespaces) == 9
    assert sum("veth" in c for c in cmds) == 8
    shaped = {(c[2], c[6]) for c in cmds if c[0] == "tc"}
    assert len(shaped) == 16 and ("ftb4194304-br", "p7") in shaped and ("ftb4194304-n7", "eth0") in shaped
    assert all(c[0] == "ip" and c[1:3] == ["netns", "add"] for c in cmds[:9])   # namespaces first
    assert all(len(n) <= 15 for n in _ifnames(cmds))
    assert not any(c[0] == "tc" for c in netns.Topology(3, None).setup_commands())   # unshaped


def test_topology_rejects_bad_input():
    for n in (1, 9):
        with pytest.raises(ValueError, match="nodes"):
            netns.Topology(n, None)
    with pytest.raises(ValueError, match="prefix"):
        netns.Topology(2, None, prefix="a-b")


def test_check_available(monkeypatch):
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None if tool == "tc" else "/usr/sbin/ip")
    with pytest.raises(netns.NetnsUnavailable, match="tc not found"):
        netns.check_available()
    monkeypatch.setattr(netns.shutil, "which", lambda tool: "/usr/sbin/" + tool)
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    with pytest.raises(netns.NetnsUnavailable, match="root"):
        netns.check_available()


def test_main_refuses_without_root(monkeypatch, capsys):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert comm.main(["--nodes", "2", "--compressors", "none", "--out", "/nonexistent/never-written"]) == 2
    assert "need root" in capsys.readouterr().err


def test_rows():
    row = comm.parse_row("torch_powersgd:rank=1,real")
    assert row.compressor == "torch_powersgd" and row.name == "torch_powersgd-rank-1-real"
    assert row.overrides == ("comm.compressor=torch_powersgd", "comm.powersgd.rank=1", "model.fno.spectral_weights=real")
    assert comm.parse_row("none:optim.lr=1e-3").overrides[1] == "optim.lr=1e-3"
    assert comm._split_specs("none,fp16,torch_powersgd:rank=1,real powersgd:rank=4") == \
        ["none", "fp16", "torch_powersgd:rank=1,real", "powersgd:rank=4"]
    with pytest.raises(ValueError, match="no ':'"):
        comm._split_specs("fp16,rank=4")
    with pytest.raises(ValueError, match="neither"):
        comm.parse_row("powersgd:fast")
    with pytest.raises(ValueError, match="nonexistent"):
        comm.check_rows([comm.parse_row("nonexistent")])
    with pytest.raises(ValueError, match="twice"):
        comm.check_rows([comm.parse_row("none"), comm.parse_row("none")])


def test_main_rejects_bad_arguments(capsys):
    assert comm.main(["--nodes", "9"]) == 2
    assert comm.main(["--bandwidths", "fast"]) == 2
    assert comm.main(["--compressors", "nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "--nodes 9" in err and "'fast'" in err and "nonexistent" in err


def test_rank_command():
    topo = netns.Topology(4, 10**8, prefix="ftb1")
    cmd = comm.rank_command(topo, 2, comm.parse_row("fp16"), comm.ROOT / "out", 29501, 50, 10)
    assert cmd[:5] == ["ip", "netns", "exec", "ftb1-n2", "env"]
    for kv in ("RANK=2", "WORLD_SIZE=4", "MASTER_ADDR=198.18.0.1", "MASTER_PORT=29501", "GLOO_SOCKET_IFNAME=eth0",
               "OMP_NUM_THREADS=1", "run.threads_per_rank=1", "comm.compressor=fp16", "train.max_steps=50",
               "train.eval_every=10"):
        assert kv in cmd
    # 2 namespaces x 2 ranks: rank 3 is node 1's second rank, in namespace n1
    topo = netns.Topology(2, 10**8, prefix="ftb1")
    cmd = comm.rank_command(topo, 3, comm.parse_row("int8:comm.hierarchy=node"), comm.ROOT / "out", 29501, 50, 10,
                            per_node=2)
    assert cmd[:4] == ["ip", "netns", "exec", "ftb1-n1"]
    for kv in ("RANK=3", "WORLD_SIZE=4", "LOCAL_RANK=1", "LOCAL_WORLD_SIZE=2", "comm.hierarchy=node"):
        assert kv in cmd


def test_metrics_and_comparisons(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    lines = ["step,epoch,train_loss,test_rel_l2,lr,step_time_s,bytes_per_step,compression_ratio,skipped_steps"]
    for s in range(1, 11):
        lines.append(f"{s},0,0.5,,0.001,{20.0 if s == 1 else 1.0 + s / 100},100,2.0,0")
        if s % 5 == 0:
            lines.append(f"{s},0,,{0.5 - s / 100},,,,,")
    csv_path.write_text("\n".join(lines) + "\n")
    train, evals = comm.read_metrics(csv_path)
    assert len(train) == 10 and evals == [(5, 0.45), (10, 0.4)]
    assert comm.median_step_time(train) == pytest.approx(1.08)            # steps 6..10
    # step 1 (start-up) counts at the median: 1.08 + steps 2..5
    assert comm.time_to_target(train, evals, 0.45) == pytest.approx(1.08 + 4 + 0.14)
    assert comm.time_to_target(train, evals, 0.1) is None

    def rec(row, t, l2):
        return {"row": row, "status": "ok", "median_step_s": t, "test_rel_l2": l2,
                "_train": [(1, t), (2, t)], "_evals": [(2, l2)]}
    records = [rec("skip", 1.0, 0.6), rec("none", 3.0, 0.4), rec("powersgd:rank=4", 1.5, 0.45),
               {"row": "int8", "status": "failed", "error": "boom"}]
    comm.compare(records)
    by = {r["row"]: r for r in records}
    assert by["powersgd:rank=4"]["ratio_to_floor"] == pytest.approx(1.5)
    assert by["powersgd:rank=4"]["overhead_removed"] == pytest.approx(0.75)
    assert by["powersgd:rank=4"]["time_to_fp32_l2_s"] == "never"
    assert by["none"]["time_to_fp32_l2_s"] == pytest.approx(6.0) and by["none"]["overhead_removed"] == 0
    assert "_train" not in by["none"] and "floor_step_s" not in by["int8"]


def test_repeats_aggregate_to_medians_and_spread():
    """--repeats: one row per (bandwidth, row), medians of each measure, the min-max spread of step times, and a
    repeat that failed counted, not averaged in."""
    def rec(row, rep, step, status="ok", **more):
        return {"row": row, "bandwidth": "100mbit", "nodes": 2, "status": status, "repeat": rep, "error": "",
                "median_step_s": step if status == "ok" else None, "overhead_removed": more.get("rm"),
                "time_to_fp32_l2_s": more.get("t2", "never")}
    records = [rec("skip", 0, 1.0), rec("none", 0, 2.0), rec("int8", 0, 1.2, rm=0.8, t2=10.0),
               rec("skip", 1, 1.1), rec("none", 1, 2.2), rec("int8", 1, 1.4, rm=0.7, t2=12.0),
               rec("skip", 2, 0.9), rec("none", 2, 2.1), rec("int8", 2, 9.9, status="timeout")]
    agg = {r["row"]: r for r in comm.aggregate(records)}
    assert agg["skip"]["median_step_s"] == 1.0 and agg["skip"]["step_spread"] == "0.900-1.100"
    assert agg["int8"]["status"] == "2/3 ok" and agg["int8"]["median_step_s"] == pytest.approx(1.3)
    assert agg["int8"]["overhead_removed"] == pytest.approx(0.75) and agg["int8"]["time_to_fp32_l2_s"] == 11.0
    assert comm.aggregate(records[:3]) == records[:3]      # one repeat: unchanged
