"""The node's rotated log file and its tail (what the admin reads remotely)."""

from __future__ import annotations

import logging

import pytest

from tiktrue.monitoring import node_logging
from tiktrue.monitoring.node_logging import node_log_path, setup_node_logging, tail_log


def test_the_log_rotates_and_its_tail_spans_the_files(tmp_path, monkeypatch):
    monkeypatch.setattr(node_logging, "MAX_BYTES", 2000)
    path = setup_node_logging(tmp_path)
    assert setup_node_logging(tmp_path) == path == node_log_path(tmp_path)  # added once
    root = logging.getLogger()
    handlers = [h for h in root.handlers if getattr(h, "baseFilename", None) == str(path)]
    assert len(handlers) == 1
    log = logging.getLogger("tiktrue.test")
    log.setLevel(logging.INFO)
    try:
        for i in range(60):
            log.info("line %d of the test", i)
        try:
            raise RuntimeError("a failure")
        except RuntimeError:
            log.exception("it failed")
        log.info("after the failure")
    finally:
        root.removeHandler(handlers[0])
        handlers[0].close()
    assert path.with_name("node.log.1").is_file()  # rotated
    assert len(path.read_text().splitlines()) < 50
    tail = tail_log(tmp_path, 50)  # from the rotated file too
    assert len(tail) == 50 and tail[-1].endswith("after the failure")
    assert tail[0] not in path.read_text()  # an older, rotated file
    errors = tail_log(tmp_path, 50, "ERROR")
    assert errors[0].endswith("it failed") and "RuntimeError: a failure" in errors[-1]
    assert not any("after the failure" in line for line in errors)
    with pytest.raises(ValueError):
        tail_log(tmp_path, 10, "LOUD")
