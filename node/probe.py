"""Measuring this machine for the planner: memory it may use, its compute and memory bandwidth, its LAN addresses.

Memory is the least of: what psutil says is available, what the process's cgroup still allows (``memory.max`` minus
``memory.current`` on cgroup v2, ``memory.limit_in_bytes`` minus usage on v1: a container sees its own limit, not
the host's RAM), and the user's ``--memory`` cap. On CUDA it is the GPU's free memory; MPS shares system memory.
The compute and bandwidth probes are short (about half a second) and single-threaded like a node's compute.

Several nodes may run on one machine (``serve --nodes N``, or a ``join`` beside them): each measures the same free
memory and the same cores. So a node also says which machine it is on (``host_id``), what that machine has free for
all its nodes (``host_memory_free``, before this node's cap) and its cores, and the planner shares them out
(``coordinator.planner.hosts``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import re
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

_CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True, slots=True)
class DeviceMeasurement:
    kind: str  # cpu, cuda, mps
    name: str
    memory_total: int
    memory_free: int
    tflops: float
    membw_gbs: float
    host_id: str = ""  # the machine (cpu, mps) or GPU (cuda) this node shares with others on it
    host_memory_free: int = 0  # free on that machine or GPU for all its nodes (no --memory cap)
    host_cores: int = 0
    threads: int = 1


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """Bytes in ``12GB`` (decimal), ``12GiB`` (binary), ``512MB`` or a plain number.

    Raises:
        ValueError: not a size.
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a memory size: {text!r} (write e.g. 12GB or 12GiB)")
    return round(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text in ("max", ""):
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value < 1 << 60 else None  # v1 "unlimited" is a huge number


def _own_cgroup_dir(root: Path) -> Path:
    """This process's cgroup v2 directory (``0::/path`` in /proc/self/cgroup), else the root."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                candidate = root / line[3:].lstrip("/")
                if (candidate / "memory.max").exists():
                    return candidate
    except OSError:
        pass
    return root


def cgroup_memory(root: Path = _CGROUP_ROOT) -> tuple[int, int] | None:
    """(limit, usage) of this process's cgroup when it has a memory limit, else None."""
    v2 = _own_cgroup_dir(root)
    limit = _read_int(v2 / "memory.max")
    if limit is not None:
        return limit, _read_int(v2 / "memory.current") or 0
    limit = _read_int(root / "memory" / "memory.limit_in_bytes")
    if limit is not None:
        return limit, _read_int(root / "memory" / "memory.usage_in_bytes") or 0
    return None


def system_memory(cap: int | None = None, cgroup_root: Path = _CGROUP_ROOT) -> tuple[int, int]:
    """(total, free) bytes of host memory this process may use."""
    vm = psutil.virtual_memory()
    total, free = int(vm.total), int(vm.available)
    cg = cgroup_memory(cgroup_root)
    if cg is not None:
        limit, usage = cg
        total, free = min(total, limit), min(free, max(0, limit - usage))
    if cap is not None:
        total, free = min(total, cap), min(free, cap)
    return total, free


def host_id(device: str = "cpu") -> str:
    """A short hash naming this machine: the same in every process on it (boot id + hostname), with the GPU for
    ``cuda:i`` (two GPUs of one machine share no memory). Two containers with their own hostnames differ."""
    boot = ""
    for path in ("/proc/sys/kernel/random/boot_id", "/etc/machine-id"):
        try:
            boot = Path(path).read_text().strip()
            break
        except OSError:
            continue
    kind, _, index = device.partition(":")
    pool = f"cuda:{index or 0}" if kind == "cuda" else "ram"  # mps shares system memory with the cpu
    return hashlib.sha256(f"{boot}|{socket.gethostname()}|{pool}".encode()).hexdigest()[:16]


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), else the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _probe_compute(device: str) -> tuple[float, float]:
    """(TFLOP/s of an fp32 matmul, GB/s of a tensor copy) measured for about 0.2 s each."""
    import torch

    dev = torch.device(device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    n = 512 if dev.type == "cpu" else 4096
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    torch.mm(a, b)
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.2:
        torch.mm(a, b)
        reps += 1
    sync()
    tflops = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12
    src = torch.empty(16 * 2**20 if dev.type == "cpu" else 256 * 2**20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.2:
        dst.copy_(src)
        reps += 1
    sync()
    membw = 2 * src.numel() * reps / (time.perf_counter() - t0) / 1e9  # read + write
    return tflops, membw


def measure_device(device: str = "auto", memory_cap: int | None = None, threads: int = 1) -> DeviceMeasurement:
    """Measure the device a node will compute on (``auto``: CUDA if present, then MPS, else CPU) with ``threads``
    compute threads."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind = device.split(":")[0]
    if kind == "cuda":
        index = torch.device(device).index or 0
        free, total = torch.cuda.mem_get_info(index)
        host_free = free
        device = f"cuda:{index}"
        if memory_cap is not None:
            total, free = min(total, memory_cap), min(free, memory_cap)
        name = f"cuda:{index} {torch.cuda.get_device_name(index)}"
    else:
        total, free = system_memory(memory_cap)
        host_free = system_memory()[1]
        name = "mps (unified memory)" if kind == "mps" else f"cpu ({os.cpu_count()} cores)"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tflops, membw = _probe_compute(device)
    finally:
        torch.set_num_threads(threads)
    m = DeviceMeasurement(kind, name, int(total), int(free), round(tflops, 4), round(membw, 2), host_id(device),
                          int(host_free), usable_cores(), threads)  # fmt: skip
    log.info("device %s: %.2f GB free of %.2f GB, %.3f TFLOP/s fp32, %.1f GB/s memory", m.name, m.memory_free / 1e9,
             m.memory_total / 1e9, m.tflops, m.membw_gbs)  # fmt: skip
    return m


def refresh_memory(m: DeviceMeasurement, memory_cap: int | None = None) -> DeviceMeasurement:
    """The same device with its free memory measured again (cheap; for re-announcing)."""
    if m.kind == "cuda":
        import torch

        host_free, _ = torch.cuda.mem_get_info(int(m.name.split()[0].split(":")[1]))
        free = min(host_free, memory_cap) if memory_cap is not None else host_free
    else:
        _, free = system_memory(memory_cap)
        host_free = system_memory()[1]
    return replace(m, memory_free=int(free), host_memory_free=int(host_free))


def lan_addresses() -> list[str]:
    """This machine's IPv4 addresses others can reach: never loopback, link-local only when nothing else."""
    import ifaddr

    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and ip.ip not in found:
                found.append(ip.ip)
    addrs = [ipaddress.IPv4Address(a) for a in found]
    usable = [a for a in addrs if not a.is_loopback and not a.is_link_local and not a.is_unspecified]
    if not usable:
        usable = [a for a in addrs if a.is_link_local]
    return [str(a) for a in usable]


def interfaces_summary() -> list[str]:
    """``name (ip, …)`` for each interface with an IPv4 address: what the mDNS sockets listen on."""
    import ifaddr

    out = []
    for adapter in ifaddr.get_adapters():
        ips = [ip.ip for ip in adapter.ips if isinstance(ip.ip, str)]
        if ips:
            out.append(f"{adapter.nice_name} ({', '.join(ips)})")
    return out
