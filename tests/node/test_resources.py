"""A node's resources (read from this PC) and the caps the admin sets."""

from __future__ import annotations

import socket

import psutil
import pytest
from pydantic import ValidationError

from tiktrue.node import resources as resources_module
from tiktrue.node.resources import (
    GpuInfo,
    NodeCaps,
    NodeResources,
    collect_resources,
    cpu_model,
    format_bytes,
)

GiB = 1024**3


def test_collect_resources_of_this_pc(tmp_path):
    found = collect_resources(tmp_path)
    assert 1 <= found.cpu_cores_physical <= found.cpu_cores_logical
    assert found.cpu_cores_logical == psutil.cpu_count(logical=True)
    assert 0.0 <= found.cpu_load_percent <= 100.0 * found.cpu_cores_logical
    assert found.cpu_model and found.cpu_model != "unknown"
    assert 0 < found.ram_free_bytes <= found.ram_total_bytes
    assert found.ram_total_bytes == psutil.virtual_memory().total
    assert 0 < found.disk_free_bytes <= found.disk_total_bytes
    assert found.disk_total_bytes == psutil.disk_usage(str(tmp_path)).total
    assert found.hostname == socket.gethostname()
    assert found.os and found.os != "unknown"
    for gpu in found.gpus:
        assert gpu.name and gpu.memory_total_bytes > 0 and gpu.backend
        assert gpu.memory_free_bytes is None or gpu.memory_free_bytes <= gpu.memory_total_bytes
    again = NodeResources.model_validate_json(found.model_dump_json())
    assert again == found


def test_a_data_dir_not_made_yet_is_measured_on_its_volume(tmp_path):
    found = collect_resources(tmp_path / "not" / "yet", cpu_sample_s=0, probe_gpus=False)
    assert found.disk_total_bytes == psutil.disk_usage(str(tmp_path)).total
    assert found.gpus == []


def test_a_failing_probe_leaves_a_safe_default(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("probe failed")

    monkeypatch.setattr(resources_module.psutil, "virtual_memory", broken)
    monkeypatch.setattr(resources_module.psutil, "disk_usage", broken)
    monkeypatch.setattr(resources_module.psutil, "cpu_count", broken)
    monkeypatch.setattr(resources_module, "cpu_model", broken)
    found = collect_resources(tmp_path, cpu_sample_s=0, probe_gpus=False)
    assert (found.ram_total_bytes, found.ram_free_bytes) == (0, 0)
    assert (found.disk_total_bytes, found.disk_free_bytes) == (0, 0)
    assert found.cpu_cores_logical >= 1 and found.cpu_cores_physical >= 1
    assert found.cpu_model == "unknown"


def test_cpu_model_is_a_name():
    name = cpu_model()
    assert isinstance(name, str) and name.strip() and not name.isdigit()


def _resources(**changes) -> NodeResources:
    values = dict(
        cpu_cores_physical=4,
        cpu_cores_logical=8,
        cpu_model="Test CPU",
        cpu_load_percent=12.5,
        ram_total_bytes=16 * GiB,
        ram_free_bytes=10 * GiB,
        disk_total_bytes=500 * GiB,
        disk_free_bytes=100 * GiB,
        gpus=[GpuInfo(name="Test GPU", memory_total_bytes=8 * GiB, backend="cuda")],
        os="Linux",
        hostname="pc-1",
    )
    return NodeResources(**{**values, **changes})


def test_resources_must_be_consistent():
    with pytest.raises(ValidationError, match="free RAM exceeds"):
        _resources(ram_free_bytes=17 * GiB)
    with pytest.raises(ValidationError, match="free disk exceeds"):
        _resources(disk_free_bytes=501 * GiB)
    with pytest.raises(ValidationError, match="physical cores"):
        _resources(cpu_cores_physical=9)


def test_caps_default_to_a_share_of_the_node():
    effective = NodeCaps().effective(_resources())
    assert effective.ram_bytes == int(16 * GiB * 0.8)
    assert effective.threads == 8
    assert effective.disk_bytes == int(100 * GiB * 0.9)


def test_caps_that_fit_are_kept():
    caps = NodeCaps(ram_bytes=16 * GiB, threads=2, disk_bytes=100 * GiB)
    assert caps.effective(_resources()) == caps
    partial = NodeCaps(threads=3).effective(_resources())
    assert (partial.threads, partial.ram_bytes) == (3, int(16 * GiB * 0.8))


def test_caps_cannot_exceed_the_node():
    resources = _resources()
    with pytest.raises(ValueError, match=r"RAM cap 32\.0 GiB exceeds the node's 16\.0 GiB"):
        NodeCaps(ram_bytes=32 * GiB).effective(resources)
    with pytest.raises(ValueError, match="thread cap 9 exceeds the node's 8 logical cores"):
        NodeCaps(threads=9).effective(resources)
    with pytest.raises(ValueError, match="disk cap 150.0 GiB exceeds"):
        NodeCaps(disk_bytes=150 * GiB).effective(resources)
    with pytest.raises(ValueError, match="RAM cap .*; thread cap"):
        NodeCaps(ram_bytes=32 * GiB, threads=64).effective(resources)
    # What TikTrue already stores counts as available to it.
    caps = NodeCaps(disk_bytes=150 * GiB)
    assert caps.effective(resources, used_disk_bytes=60 * GiB).disk_bytes == 150 * GiB


def test_caps_must_be_positive():
    for bad in (dict(ram_bytes=0), dict(threads=0), dict(disk_bytes=-1)):
        with pytest.raises(ValidationError):
            NodeCaps(**bad)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * GiB // 2) == "1.5 GiB"
    assert format_bytes(2 * 1024 * GiB) == "2.0 TiB"
