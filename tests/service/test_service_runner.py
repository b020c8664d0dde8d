"""The node service's answers that must stay cheap: they run on its event loop."""

from __future__ import annotations

import psutil

from tiktrue.service.service_runner import NodeService


def test_node_info_and_heartbeat_never_wait_for_a_cpu_sample(tmp_path, monkeypatch):
    """``cpu_percent(interval=0.1)`` blocked the control channel for 100 ms per call."""
    service = NodeService(tmp_path / "home", announce=False)  # primes the counter
    intervals = []
    real = psutil.cpu_percent

    def recording(interval=None, percpu=False):
        intervals.append(interval)
        return real(interval=None, percpu=percpu)

    monkeypatch.setattr(psutil, "cpu_percent", recording)
    info = service.node_info()
    beat = service.heartbeat("no-such-network")
    assert intervals and all(i is None for i in intervals), intervals
    assert info["resources"]["cpu_cores_logical"] >= 1
    assert beat["serving"] is False and beat["rss_bytes"] > 0 and beat["version"] is None
