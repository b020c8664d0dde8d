"""Progress lines: a few per transfer, per node when several run at once."""

from __future__ import annotations

from types import SimpleNamespace as P

from tiktrue.ui.progress import progress_printer


def test_one_line_per_step_and_per_node():
    lines: list[str] = []
    progress = progress_printer(
        lines.append,
        lambda p: f"{p.node_id} {p.sent_bytes}",
        steps=4,
        done="sent_bytes",
        per="node_id",
    )
    for sent in range(0, 101, 5):  # chunks of 5 of 100 bytes, two nodes interleaved
        progress(P(node_id="a", sent_bytes=sent, total_bytes=100))
        progress(P(node_id="b", sent_bytes=sent, total_bytes=100))
    assert [line for line in lines if line.startswith("a")] == [
        "a 0",
        "a 25",
        "a 50",
        "a 75",
        "a 100",
    ]
    assert len(lines) == 10
