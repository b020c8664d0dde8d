"""What a node has (CPU, RAM, disk, GPUs) and what the admin lets TikTrue use of it (caps).

``collect_resources(data_dir)`` is what a node reports to its admin; it never raises: a probe
that fails leaves its field at a safe default (0 bytes, 1 core, "unknown", no GPUs).
``NodeCaps`` are the per-node limits the admin sets; ``caps.effective(resources)`` fills the
unset ones with defaults and refuses caps larger than what the node has.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import random
import socket
import subprocess
import sys
from pathlib import Path

import psutil
from pydantic import BaseModel, Field, model_validator

log = logging.getLogger(__name__)

DEFAULT_RAM_FRACTION = 0.8  # of total RAM, when the admin set no RAM cap
DEFAULT_DISK_FRACTION = 0.9  # of free disk, when the admin set no disk cap
UNKNOWN = "unknown"


class GpuInfo(BaseModel):
    name: str
    memory_total_bytes: int = Field(ge=0)
    memory_free_bytes: int | None = Field(None, ge=0)
    backend: str = Field(description='"cuda", "rocm", "mps" or "xpu"')


class NodeResources(BaseModel):
    cpu_cores_physical: int = Field(ge=1)
    cpu_cores_logical: int = Field(ge=1)
    cpu_model: str = UNKNOWN
    cpu_load_percent: float = Field(0.0, ge=0.0)
    ram_total_bytes: int = Field(0, ge=0)
    ram_free_bytes: int = Field(0, ge=0)
    disk_total_bytes: int = Field(0, ge=0, description="of the volume holding the data dir")
    disk_free_bytes: int = Field(0, ge=0)
    gpus: list[GpuInfo] = Field(default_factory=list)
    os: str = UNKNOWN
    hostname: str = UNKNOWN

    @model_validator(mode="after")
    def _consistent(self) -> NodeResources:
        if self.cpu_cores_physical > self.cpu_cores_logical:
            raise ValueError(
                f"{self.cpu_cores_physical} physical cores but only "
                f"{self.cpu_cores_logical} logical ones"
            )
        if self.ram_free_bytes > self.ram_total_bytes:
            raise ValueError("free RAM exceeds total RAM")
        if self.disk_free_bytes > self.disk_total_bytes:
            raise ValueError("free disk exceeds total disk")
        return self


class NodeCaps(BaseModel):
    """Limits the admin sets for one node; ``None`` means "no cap" (a default applies)."""

    ram_bytes: int | None = Field(None, gt=0)
    threads: int | None = Field(None, ge=1)
    disk_bytes: int | None = Field(None, gt=0)

    def effective(self, resources: NodeResources, *, used_disk_bytes: int = 0) -> NodeCaps:
        """These caps with every ``None`` filled in, checked against ``resources``.

        Defaults: RAM 80 % of total, threads = logical cores, disk 90 % of free space (plus
        ``used_disk_bytes``: what TikTrue already stores there, which free space leaves out).
        Raises ``ValueError`` when a cap exceeds what the node has.
        """
        if used_disk_bytes < 0:
            raise ValueError(f"used_disk_bytes must be >= 0, not {used_disk_bytes}")
        disk_available = resources.disk_free_bytes + used_disk_bytes
        problems = []
        if self.ram_bytes is not None and self.ram_bytes > resources.ram_total_bytes:
            problems.append(
                f"RAM cap {format_bytes(self.ram_bytes)} exceeds the node's "
                f"{format_bytes(resources.ram_total_bytes)} of RAM"
            )
        if self.threads is not None and self.threads > resources.cpu_cores_logical:
            problems.append(
                f"thread cap {self.threads} exceeds the node's "
                f"{resources.cpu_cores_logical} logical cores"
            )
        if self.disk_bytes is not None and self.disk_bytes > disk_available:
            problems.append(
                f"disk cap {format_bytes(self.disk_bytes)} exceeds the "
                f"{format_bytes(disk_available)} the node has available"
                + (
                    f" ({format_bytes(used_disk_bytes)} already used by TikTrue)"
                    if used_disk_bytes
                    else ""
                )
            )
        if problems:
            raise ValueError(f"caps for {resources.hostname} do not fit: " + "; ".join(problems))
        return NodeCaps(
            ram_bytes=ram_cap(self.ram_bytes, resources.ram_total_bytes),
            threads=self.threads or resources.cpu_cores_logical,
            disk_bytes=self.disk_bytes
            or max(1, used_disk_bytes + int(resources.disk_free_bytes * DEFAULT_DISK_FRACTION)),
        )


def ram_cap(cap_bytes: int | None, ram_total_bytes: int) -> int:
    """The RAM TikTrue may use on a node: the admin's cap, else ``DEFAULT_RAM_FRACTION`` of
    the node's total RAM. The planner and the node itself both size a span by this."""
    return cap_bytes or max(1, int(ram_total_bytes * DEFAULT_RAM_FRACTION))


def format_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


# --- probes ----------------------------------------------------------------------------------


def collect_resources(
    data_dir: Path, *, cpu_sample_s: float = 0.1, probe_gpus: bool = True
) -> NodeResources:
    """This PC's resources; disk figures are for the volume holding ``data_dir``.

    ``cpu_sample_s``: how long to sample CPU load (0 = since the previous call in this
    process, which is 0.0 the first time). ``probe_gpus=False`` skips importing torch.
    """
    logical = _probe("logical cores", lambda: psutil.cpu_count(logical=True)) or os.cpu_count()
    logical = max(1, logical or 1)
    physical = _probe("physical cores", lambda: psutil.cpu_count(logical=False)) or logical
    physical = max(1, min(physical, logical))
    load = _probe("CPU load", lambda: psutil.cpu_percent(interval=cpu_sample_s or None))
    memory = _probe("RAM", psutil.virtual_memory)
    ram_total = int(memory.total) if memory else 0
    ram_free = int(memory.available) if memory else 0
    disk = _probe("disk", lambda: psutil.disk_usage(str(_existing(Path(data_dir)))))
    disk_total = int(disk.total) if disk else 0
    disk_free = int(disk.free) if disk else 0
    return NodeResources(
        cpu_cores_physical=physical,
        cpu_cores_logical=logical,
        cpu_model=_probe("CPU model", cpu_model) or UNKNOWN,
        cpu_load_percent=max(0.0, float(load or 0.0)),
        ram_total_bytes=ram_total,
        ram_free_bytes=min(ram_free, ram_total),
        disk_total_bytes=disk_total,
        disk_free_bytes=min(disk_free, disk_total),
        gpus=(_probe("GPUs", gpus) or []) if probe_gpus else [],
        os=_probe("OS", _os_name) or UNKNOWN,
        hostname=_probe("hostname", socket.gethostname) or UNKNOWN,
    )


def heartbeat_stats(data_dir: Path) -> dict:
    """The cheap figures a heartbeat carries: CPU load since the last call (no sampling
    window), RAM, disk of the data dir, and this process's RSS."""
    memory = _probe("RAM", psutil.virtual_memory)
    disk = _probe("disk", lambda: psutil.disk_usage(str(_existing(Path(data_dir)))))
    return {
        "cpu_percent": _probe("CPU load", lambda: psutil.cpu_percent(interval=None)),
        "cpu_cores_logical": psutil.cpu_count(logical=True),
        "ram_total_bytes": int(memory.total) if memory else None,
        "ram_free_bytes": int(memory.available) if memory else None,
        "disk_total_bytes": int(disk.total) if disk else None,
        "disk_free_bytes": int(disk.free) if disk else None,
        "rss_bytes": _probe("RSS", lambda: psutil.Process().memory_info().rss),
    }


def _probe(what, func):
    try:
        return func()
    except Exception as exc:  # a probe must never take the node down
        log.warning("cannot read %s: %s", what, exc)
        return None


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (disk_usage needs an existing path)."""
    path = path.expanduser().absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return path


def _os_name() -> str:
    return " ".join(p for p in (platform.system(), platform.release(), platform.machine()) if p)


def cpu_model() -> str:
    """The CPU's marketing name where the OS tells it, else ``platform.processor()``."""
    name = ""
    if sys.platform.startswith("linux"):
        name = _linux_cpu_model()
    elif sys.platform == "win32":
        name = _windows_cpu_model()
    elif sys.platform == "darwin":
        name = _mac_cpu_model()
    return name or platform.processor() or platform.machine() or UNKNOWN


def _linux_cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text("utf-8", errors="replace")
    except OSError:
        return ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            fields.setdefault(key.strip().lower(), value.strip())
    # x86: "model name"; ARM boards: "Hardware" / "Model"; others: "cpu model" / "cpu".
    for key in ("model name", "hardware", "model", "cpu model", "cpu", "processor"):
        value = fields.get(key, "")
        if value and not value.isdigit():
            return value
    return ""


def _windows_cpu_model() -> str:
    import winreg  # only on Windows

    key = r"HARDWARE\DESCRIPTION\System\CentralProcessor\0"
    with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, key) as handle:
        return str(winreg.QueryValueEx(handle, "ProcessorNameString")[0]).strip()


def _mac_cpu_model() -> str:
    done = subprocess.run(
        ["sysctl", "-n", "machdep.cpu.brand_string"],
        capture_output=True,
        text=True,
        timeout=2,
        check=False,
    )
    return done.stdout.strip()


def gpus() -> list[GpuInfo]:
    """GPUs torch can use (CUDA/ROCm, Apple MPS, Intel XPU); empty without torch."""
    if "torch" not in sys.modules and importlib.util.find_spec("torch") is None:
        return []
    import torch

    found: list[GpuInfo] = []
    if torch.cuda.is_available():
        backend = "rocm" if getattr(torch.version, "hip", None) else "cuda"
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            free = _probe(f"free memory of GPU {index}", lambda i=index: torch.cuda.mem_get_info(i))
            found.append(
                GpuInfo(
                    name=props.name,
                    memory_total_bytes=int(props.total_memory),
                    memory_free_bytes=int(free[0]) if free else None,
                    backend=backend,
                )
            )
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and _probe("XPU", xpu.is_available):
        for index in range(xpu.device_count()):
            props = xpu.get_device_properties(index)
            found.append(
                GpuInfo(
                    name=str(getattr(props, "name", f"xpu:{index}")),
                    memory_total_bytes=int(getattr(props, "total_memory", 0)),
                    backend="xpu",
                )
            )
    mps = getattr(torch.backends, "mps", None)
    if not found and mps is not None and mps.is_available():
        # Apple silicon: unified memory; torch reports how much Metal recommends using.
        total = _probe("MPS memory", lambda: torch.mps.recommended_max_memory())
        if not total:
            total = psutil.virtual_memory().total
        found.append(
            GpuInfo(name=f"Apple {platform.machine()} GPU", memory_total_bytes=total, backend="mps")
        )
    return found


# Ports a node gives its networks lie below every OS's range of ephemeral ports (Linux
# 32768-60999, Windows and macOS 49152-65535): the OS never hands one of these to an outgoing
# connection, which could take a network's port between being chosen and being listened on
# (seen when many nodes start at once) or before a restarted node listens on it again.
PORT_RANGE = (20000, 32000)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports in ``PORT_RANGE`` that nothing on ``host`` listens on now."""
    chosen: list[int] = []
    rng = random.SystemRandom()
    for _ in range(count * 200):
        port = rng.randrange(*PORT_RANGE)
        if port in chosen:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        chosen.append(port)
        if len(chosen) == count:
            return chosen
    raise OSError(f"no {count} free ports in {PORT_RANGE[0]}-{PORT_RANGE[1]} on {host}")
