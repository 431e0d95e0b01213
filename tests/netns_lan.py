"""A real LAN on this machine: one network namespace per host, veth pairs on a bridge in a switch namespace.

Nothing touches the host's own network: the bridge lives in its own namespace too. ``NetnsLan`` tears everything
down on ``close()`` (also after a failed test), and ``drop_multicast`` adds an nftables rule (with a counter) in
each host that drops multicast both ways, as a network that blocks mDNS does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence


def why_not_available() -> str | None:
    """None when this machine can build the LAN; else the reason to skip."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install iproute2 nftables)"
    probe = f"llnprobe{os.getpid()}"
    try:
        subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True)
        subprocess.run(["ip", "netns", "del", probe], check=True, capture_output=True)
    except subprocess.CalledProcessError as e:
        return f"cannot create network namespaces: {e.stderr.decode(errors='replace').strip()}"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class NetnsLan:
    """``n`` hosts ``10.77.X.1 .. 10.77.X.n`` (/24) on one bridge; ``exec_args(i)`` runs a command on host ``i``."""

    def __init__(self, n: int, subnet: int = 77) -> None:
        self.tag = f"ln{os.getpid() % 100000}"
        self.switch = f"{self.tag}sw"
        self.hosts = [f"{self.tag}h{i}" for i in range(n)]
        self.addresses = [f"10.{subnet}.{os.getpid() % 200 + 1}.{i + 1}" for i in range(n)]
        self._made: list[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        _ip("netns", "add", self.switch)
        self._made.append(self.switch)
        sw = ["-n", self.switch]
        _ip(*sw, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip(*sw, "link", "set", "br0", "up")
        for i, (host, addr) in enumerate(zip(self.hosts, self.addresses, strict=True)):
            _ip("netns", "add", host)
            self._made.append(host)
            # both ends are created in the switch namespace, then one moves: no name ever appears in the host's
            _ip(*sw, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", host)
            _ip(*sw, "link", "set", f"p{i}", "master", "br0", "up")
            _ip("-n", host, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", host, "link", "set", "eth0", "up")
            _ip("-n", host, "link", "set", "lo", "up")
            _ip("-n", host, "route", "add", "224.0.0.0/4", "dev", "eth0")

    def exec_args(self, i: int, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[i], *args]

    def drop_multicast(self, hosts: Sequence[int]) -> None:
        rules = """
        table inet llnblock {
          chain in { type filter hook input priority 0; ip daddr 224.0.0.0/4 counter drop; }
          chain out { type filter hook output priority 0; ip daddr 224.0.0.0/4 counter drop; }
        }
        """
        for i in hosts:
            subprocess.run(["ip", "netns", "exec", self.hosts[i], "nft", "-f", "-"], input=rules.encode(),
                           check=True, capture_output=True)  # fmt: skip

    def dropped_packets(self, i: int) -> int:
        out = subprocess.run(["ip", "netns", "exec", self.hosts[i], "nft", "list", "table", "inet", "llnblock"],
                             check=True, capture_output=True, text=True).stdout  # fmt: skip
        return sum(int(line.split("packets")[1].split()[0]) for line in out.splitlines() if "packets" in line)

    def close(self) -> None:
        for ns in reversed(self._made):
            # any process still in the namespace (a test that failed midway) goes first
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()

    def __enter__(self) -> NetnsLan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
