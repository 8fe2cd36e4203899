"""A Ray cluster of several nodes on this one machine, for the tests and the cluster benchmark.

Each node is a ``ray start --block`` process, as on a Slurm allocation (see README, "Running on a
cluster"), here all on 127.0.0.1 with one CPU each. The cluster's processes are those ``ray start``
processes and their descendants: that is how its memory is measured. Killing a node's process group
(its ``ray start``, raylet and, on the head, the GCS) stops it; its workers exit with their raylet.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_executable() -> Path | None:
    path = Path(sys.executable).parent / "ray"
    return path if path.exists() else None


def cluster_env(threads: int = 1) -> dict[str, str]:
    """The environment for the cluster's nodes and its drivers: ``threads`` per process, and Ray's token
    auth with a token of this cluster's own (never the user's ``~/.ray/auth_token``)."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


class LoopbackCluster:
    """``with LoopbackCluster(temp_dir, env) as cluster:`` a head node and ``nodes - 1`` more, named
    ``head``, ``node2``, ``node3``...; ``cluster.address`` for ``--cluster``, ``cluster.client`` (ray://)."""

    def __init__(self, temp_dir: str | Path, env: dict[str, str], nodes: int = 2, cpus_per_node: int = 1):
        self.temp_dir, self.env, self.n_nodes, self.cpus = Path(temp_dir), env, nodes, cpus_per_node
        self.port, self.client_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.client = f"ray://127.0.0.1:{self.client_port}"
        self.nodes: list[subprocess.Popen] = []

    def _start(self, *args: str) -> subprocess.Popen:
        ray = ray_executable()
        if ray is None:
            raise RuntimeError("Ray is not installed: pip install -e '.[cluster]'")
        return subprocess.Popen([str(ray), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}",
                                 "--num-gpus=0", "--disable-usage-stats", *args], env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def start(self, timeout: float = 120) -> "LoopbackCluster":
        self.nodes.append(self._start("--head", f"--port={self.port}", f"--ray-client-server-port={self.client_port}",
                                      "--node-name=head", "--include-dashboard=false", f"--temp-dir={self.temp_dir}"))
        self.wait_for_nodes(1, timeout)
        for k in range(2, self.n_nodes + 1):
            self.nodes.append(self._start(f"--address={self.address}", f"--node-name=node{k}"))
        self.wait_for_nodes(self.n_nodes, timeout)
        return self

    def wait_for_nodes(self, n: int, timeout: float) -> None:
        probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='error'); "
                 "print(sum(node['Alive'] for node in ray.nodes()))")
        deadline, out = time.time() + timeout, None
        while time.time() < deadline:
            out = subprocess.run([sys.executable, "-c", probe, self.address], env=self.env, capture_output=True,
                                 text=True)
            if out.returncode == 0 and out.stdout.strip() == str(n):
                return
            time.sleep(1)
        raise TimeoutError(f"the Ray cluster at {self.address} did not reach {n} node(s): "
                           f"{out.stdout if out else ''}{out.stderr[-2000:] if out else ''}")

    def pids(self) -> list[int]:
        """Every process of the cluster: its ``ray start`` processes and all their descendants (the GCS,
        raylets, agents, and the workers a raylet starts, which lead process groups of their own)."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:  # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ')'
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry.name))
        found, stack = [], [node.pid for node in self.nodes]
        while stack:
            pid = stack.pop()
            found.append(pid)
            stack.extend(children.get(pid, []))
        return found

    def rss_bytes(self) -> int:
        """The cluster's resident memory now: the sum over its processes (shared pages counted in each)."""
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                pass
        return total

    def stop(self) -> None:
        for node in reversed(self.nodes):
            try:
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            node.wait(timeout=30)
        self.nodes = []

    def __enter__(self) -> "LoopbackCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
