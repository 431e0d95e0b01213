"""``serve --nodes N``'s own nodes: N ``llama-node join`` processes on this machine that join its coordinator with
the cluster token, exactly as a node on another machine does (measure, join, mutual TLS, serve a stage).

The coordinator knows them as peers (``--peer``): each gets a free port, chosen here, and listens on it. Other
machines' nodes may send activations to them (a remote stage before a local one), so when the coordinator serves
the LAN (``--join-host 0.0.0.0``) they listen on every interface and are certified for this machine's first LAN
address; with a loopback join host (or no LAN) they stay on 127.0.0.1. They do not advertise by mDNS (the
coordinator already lists them) and stop when the ``serve`` process that started them is gone.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from coordinator.pipeline.local import stop_processes

log = logging.getLogger(__name__)


def free_port(host: str) -> int:
    """A TCP port free on ``host`` now (the node binds it a moment later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def local_address(join_host: str) -> tuple[str, str]:
    """(address the local nodes are reached and certified at, address they listen on) for a coordinator whose
    join endpoint listens on ``join_host``."""
    from node.probe import lan_addresses

    if join_host in ("0.0.0.0", "::", ""):
        lan = lan_addresses()
        return (lan[0], "0.0.0.0") if lan else ("127.0.0.1", "127.0.0.1")
    if ipaddress.ip_address(join_host).is_loopback:
        return "127.0.0.1", "127.0.0.1"
    return join_host, join_host


class LocalMembers:
    """``n`` ``llama-node join`` processes joining the coordinator at ``coordinator`` (HOST:PORT).

    Attributes:
        addresses: HOST:PORT of each node, as the coordinator reaches it (give them to it as peers).
    """

    def __init__(
        self,
        n: int,
        *,
        address: str,
        listen: str,
        threads: int = 1,
        memory: str | None = None,
        device: str = "cpu",
        log_level: str = "WARNING",
    ) -> None:
        self.n, self.threads, self.memory, self.device, self.log_level = n, threads, memory, device, log_level
        self.listen = listen
        self.ports = [free_port(listen) for _ in range(n)]
        self.addresses = [f"{address}:{p}" for p in self.ports]
        self._address = address
        self._tmp = tempfile.TemporaryDirectory(prefix="llama-node-local-")
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, coordinator: str, token: str | None) -> None:
        """Start the processes; they join ``coordinator`` with ``token`` (None: ``--insecure``)."""
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(self.threads)}
        if token is not None:
            env["LLAMA_NODE_TOKEN"] = token  # not on the command line, where `ps` shows it
        name = socket.gethostname().split(".")[0] or "node"
        for i, port in enumerate(self.ports):
            cmd = [sys.executable, "-m", "coordinator.cli", "join", "--coordinator", coordinator, "--no-mdns",
                   "--address", self._address, "--host", self.listen, "--port", str(port), "--name", f"{name}-local{i}",
                   "--threads", str(self.threads), "--device", self.device, "--log-level", self.log_level,
                   "--cache-dir", str(Path(self._tmp.name) / f"cache{i}"),
                   "--parent-pid", str(os.getpid())]  # fmt: skip
            if token is None:
                cmd.append("--insecure")
            if self.memory is not None:
                cmd += ["--memory", self.memory]
            self.procs.append(subprocess.Popen(cmd, env=env))
        log.info("started %d local node process(es) (pids %s), joining at %s as %s", self.n,
                 ", ".join(str(p.pid) for p in self.procs), coordinator, ", ".join(self.addresses))  # fmt: skip

    def exited(self) -> list[str]:
        """A line for each local node process that has exited."""
        return [f"local node {i} (pid {p.pid}) exited with code {p.returncode}"
                for i, p in enumerate(self.procs) if p.poll() is not None]  # fmt: skip

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the processes (SIGTERM, then SIGKILL after ``timeout``) and remove their caches; idempotent."""
        stop_processes(self.procs, timeout)
        self._tmp.cleanup()  # a no-op the second time
