"""Emulated slow links: Linux network namespaces joined by veth pairs, egress shaped with `tc ... tbf`.

Node i lives in namespace `<prefix>-n<i>` with address 198.18.0.<i+1>/24 (RFC 2544's benchmarking range)
on interface `eth0`. Two nodes share one veth pair. More nodes each get a veth to a bridge in namespace
`<prefix>-br`; both ends are shaped there, so every node has a full-duplex "switch port" of the given rate.
Every link is created directly inside a namespace this module names, so deleting those namespaces removes
everything; nothing is left in the root namespace even if we are killed half-way through the setup.

Needs root and iproute2 (`ip`, `tc`). The default prefix `ftb<pid>` keeps parallel runs apart, and lets
`python -m launch.netns --cleanup` find what a killed run left behind. `run_ranks` starts one command per rank, each
in its node's namespace, and waits for them (bench/comm.py, `fieldtrain study` on emulated links).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from launch.study_model import parse_rate  # noqa: F401  (the rates comm.py and the CLI read)

SUBNET = "198.18.0"
NODE_IFACE = "eth0"
MAX_NODES = 8
_STALE = re.compile(r"^ftb(\d+)-")


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be built here (not root, or `ip`/`tc` missing)."""


def tbf_args(rate_bps: int) -> list[str]:
    """tc tbf parameters for `rate_bps`: a bucket of 2 ms at line rate (at least 64 KiB, so a GSO
    super-packet fits) and a 100 ms queue."""
    burst = max(64 * 1024, rate_bps // 8 * 2 // 1000)
    return ["rate", f"{rate_bps}bit", "burst", str(burst), "latency", "100ms"]


@dataclass(frozen=True)
class Topology:
    """Names and commands for `nodes` namespaces; nothing is created until `Network` runs the commands."""
    nodes: int
    rate_bps: int | None                      # None: unshaped
    prefix: str = field(default_factory=lambda: f"ftb{os.getpid()}")

    def __post_init__(self):
        if not 2 <= self.nodes <= MAX_NODES:
            raise ValueError(f"nodes={self.nodes}; must be in 2..{MAX_NODES}")
        if not re.fullmatch(r"[A-Za-z0-9_]{1,20}", self.prefix):
            raise ValueError(f"prefix {self.prefix!r}: use 1-20 letters, digits or underscores")

    def namespace(self, i: int) -> str:
        return f"{self.prefix}-n{i}"

    @property
    def bridge_namespace(self) -> str | None:
        return f"{self.prefix}-br" if self.nodes > 2 else None

    @property
    def namespaces(self) -> list[str]:
        names = [self.namespace(i) for i in range(self.nodes)]
        return names + ([self.bridge_namespace] if self.bridge_namespace else [])

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def setup_commands(self) -> list[list[str]]:
        """The `ip`/`tc` commands that build the topology, in order."""
        cmds = [["ip", "netns", "add", ns] for ns in self.namespaces]
        if self.bridge_namespace:
            br = self.bridge_namespace
            cmds += [["ip", "-n", br, "link", "add", "br0", "type", "bridge"],
                     ["ip", "-n", br, "link", "set", "br0", "up"]]
            for i in range(self.nodes):
                port = f"p{i}"
                cmds += [["ip", "link", "add", NODE_IFACE, "netns", self.namespace(i), "type", "veth",
                          "peer", "name", port, "netns", br],
                         ["ip", "-n", br, "link", "set", port, "master", "br0"],
                         ["ip", "-n", br, "link", "set", port, "up"]]
                cmds += self._shape(br, port)
        else:
            cmds.append(["ip", "link", "add", NODE_IFACE, "netns", self.namespace(0), "type", "veth",
                         "peer", "name", NODE_IFACE, "netns", self.namespace(1)])
        for i in range(self.nodes):
            ns = self.namespace(i)
            cmds += [["ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", NODE_IFACE],
                     ["ip", "-n", ns, "link", "set", NODE_IFACE, "up"],
                     ["ip", "-n", ns, "link", "set", "lo", "up"]]
            cmds += self._shape(ns, NODE_IFACE)
        return cmds

    def _shape(self, ns: str, dev: str) -> list[list[str]]:
        if self.rate_bps is None:
            return []
        return [["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", *tbf_args(self.rate_bps)]]

    def exec_command(self, i: int, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
        """`argv` run inside node i's namespace, with `env` set (via env(1), so the line can be replayed)."""
        pairs = [f"{k}={v}" for k, v in (env or {}).items()]
        return ["ip", "netns", "exec", self.namespace(i), *(["env", *pairs] if pairs else []), *argv]


def check_available() -> None:
    """Raise NetnsUnavailable with a clear message unless we are root with `ip` and `tc` on PATH."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise NetnsUnavailable(f"{' and '.join(missing)} not found on PATH: install iproute2 "
                               f"(e.g. apt-get install iproute2)")
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root: run this as root (e.g. sudo -E)")


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()}")


def existing_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def delete_namespaces(names: list[str]) -> list[str]:
    """Delete those of `names` that exist (their veths and bridge go with them); returns failures."""
    present = set(existing_namespaces())
    failed = []
    for ns in names:
        if ns in present and subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False).returncode:
            failed.append(ns)
    return failed


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Hold off SIGINT/SIGTERM/SIGHUP (e.g. a second Ctrl-C) while cleaning up."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def exit_on_signals() -> None:
    """Turn SIGINT into KeyboardInterrupt (even where a shell started us with it ignored) and SIGTERM and
    SIGHUP into SystemExit, so `finally` blocks, and with them the teardown, run when we are told to stop."""
    def handler(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


class Network:
    """Context manager: build `topology` on entry, delete its namespaces on exit (whatever happened)."""

    def __init__(self, topology: Topology):
        self.topology = topology

    def __enter__(self) -> Topology:
        check_available()
        clash = set(self.topology.namespaces) & set(existing_namespaces())
        if clash:
            raise RuntimeError(f"namespaces {sorted(clash)} already exist; "
                               f"run `python -m launch.netns --cleanup` if a run was killed")
        try:
            for cmd in self.topology.setup_commands():
                _run(cmd)
        except BaseException:
            self.teardown()
            raise
        return self.topology

    def __exit__(self, *exc) -> None:
        self.teardown()

    def teardown(self) -> None:
        with signals_ignored():
            failed = delete_namespaces(self.topology.namespaces)
        if failed:
            print(f"warning: could not delete namespaces {failed}; delete them with `ip netns del NAME`",
                  file=sys.stderr)


def rank_env(topo: Topology, i: int, per_node: int, port: int) -> dict[str, str]:
    """torchrun's variables for rank i of `topo.nodes * per_node`, rank 0's node the master; gloo on the node's veth."""
    env = {"RANK": i, "WORLD_SIZE": topo.nodes * per_node, "LOCAL_RANK": i % per_node, "LOCAL_WORLD_SIZE": per_node,
           "MASTER_ADDR": topo.address(0), "MASTER_PORT": port, "GLOO_SOCKET_IFNAME": NODE_IFACE}
    return {k: str(v) for k, v in env.items()}


@dataclass
class Outcome:
    status: str            # ok | failed | timeout
    error: str = ""
    wall_s: float = 0.0


def _tail(path: Path, lines: int = 12, skip: str = "") -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join([line for line in text if not skip or skip not in line][-lines:])


def run_ranks(topo: Topology, commands: list[list[str]], logs: list[Path], timeout_s: float, cwd: Path | None = None,
              per_node: int = 1, skip: str = "") -> Outcome:
    """Run commands[i] as rank i in namespace i // per_node (its env already in the command: `rank_env`,
    `Topology.exec_command`), each to logs[i]; wait at most `timeout_s`, give the others 15 s after a first failure,
    and kill whatever is left. The error quotes the failing rank's log (lines containing `skip` left out)."""
    procs: list[subprocess.Popen] = []
    t0 = time.perf_counter()
    try:
        for cmd, log in zip(commands, logs):
            with log.open("w") as f:
                f.write("$ " + " ".join(cmd) + "\n")
                f.flush()
                # Own session: a Ctrl-C on the terminal reaches us, not the ranks; we stop them below.
                procs.append(subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True))
        first_failure = None
        while any(p.poll() is None for p in procs):
            now = time.perf_counter()
            if now - t0 > timeout_s:
                return Outcome("timeout", f"{_tail(logs[0], skip=skip)}\nkilled after {timeout_s:.0f} s", now - t0)
            if first_failure is None and any(p.poll() not in (None, 0) for p in procs):
                first_failure = now
            if first_failure is not None and now - first_failure > 15:   # the others wait on it
                break
            time.sleep(0.2)
        wall = time.perf_counter() - t0
        bad = [i for i, p in enumerate(procs) if p.poll() != 0]
        if bad:
            i = next((i for i in bad if procs[i].returncode not in (None, 0)), bad[0])
            return Outcome("failed", f"rank {i} exit {procs[i].returncode}:\n{_tail(logs[i], skip=skip)}", wall)
        return Outcome("ok", "", wall)
    finally:
        _stop(procs)


def _stop(procs: list[subprocess.Popen]) -> None:
    live = [p for p in procs if p.poll() is None]
    for p in live:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + 5
    for p in live:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            p.wait()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


def cleanup_stale() -> list[str]:
    """Delete `ftb<pid>-*` namespaces whose creating process is gone; returns the names deleted."""
    stale = [ns for ns in existing_namespaces()
             if (m := _STALE.match(ns)) and not os.path.exists(f"/proc/{m.group(1)}")]
    failed = delete_namespaces(stale)
    return [ns for ns in stale if ns not in failed]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cleanup", action="store_true", help="delete namespaces left by killed benchmark runs")
    p.add_argument("--show", type=int, metavar="NODES", help="print the setup commands for NODES nodes")
    p.add_argument("--rate", default="1gbit", help="with --show: the link rate")
    args = p.parse_args(argv)
    if args.show:
        for cmd in Topology(args.show, parse_rate(args.rate)).setup_commands():
            print(" ".join(cmd))
        return 0
    if args.cleanup:
        try:
            check_available()
        except NetnsUnavailable as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        deleted = cleanup_stale()
        print(f"deleted {len(deleted)} namespace(s)" + (f": {' '.join(deleted)}" if deleted else ""))
        return 0
    p.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
