"""Building networks of real node processes the way people do (create, join, plan), from a
test: shared by the journey tests and the config-sync tests."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from tiktrue.paths import run_file
from tiktrue.service.local_network import LocalCluster


def accept(home, request, **options):
    """The admin at ``home`` takes a join request (``join.accept_join``) with a writer of its
    own, as a command does where no node service runs: a grant, or a pending request's id."""
    from tiktrue.control.config_writer import ConfigWriter
    from tiktrue.control.join import accept_join

    return asyncio.run(accept_join(home, ConfigWriter(home), request, **options))


def decide(home, network_id: str, request_id: str, approve: bool = True) -> str:
    """The admin at ``home`` approves (or rejects) a join request, writing directly."""
    from tiktrue.control.config_writer import ConfigWriter
    from tiktrue.control.join import decide_join_request

    return asyncio.run(
        decide_join_request(home, ConfigWriter(home), network_id, request_id, approve)
    )


def control_address(home) -> str:
    return json.loads((Path(home) / "run" / "node.json").read_text())["control"]


def import_model_from_store(store_root, models_dir):
    """The admin PC holds the whole model (as `tiktrue models import` leaves it)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(store_root, models_dir / store_root.name)


@contextmanager
def environment(**values: str):
    """Extra environment for the node processes started inside (they inherit os.environ)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class NodeProcesses:
    """One ``tiktrue node`` process per home, each stopped and started on its own (always
    with ``--control-port 0``: a restarted node listens on a new control port). The first
    home also runs the gateway."""

    def __init__(self, homes: list[Path], *, env: dict[str, str] | None = None) -> None:
        self.homes = [Path(h) for h in homes]
        self.env = env or {}
        self.clusters: dict[Path, LocalCluster] = {}
        self.started_at: dict[Path, float] = {}  # wall time of each node's last start

    def start(self, home: Path | None = None) -> NodeProcesses:
        for h in [Path(home)] if home is not None else self.homes:
            if h not in self.clusters:
                cluster = LocalCluster(
                    [h], kv_budget_mb=16, gateway=h == self.homes[0], own_control_ports=False
                )
                with environment(**self.env):
                    self.clusters[h] = cluster.start()
                self.started_at[h] = time.time()
        return self

    def stop(self, home: Path | None = None) -> None:
        for h in [Path(home)] if home is not None else list(self.clusters):
            cluster = self.clusters.pop(h, None)
            if cluster is not None:
                cluster.stop()
                run_file(h).unlink(missing_ok=True)

    @property
    def api_url(self) -> str:
        return self.clusters[self.homes[0]].api_url


def wait_until(check, what: str, timeout: float = 120.0, every: float = 0.3):
    """Poll ``check`` until it returns something true (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
