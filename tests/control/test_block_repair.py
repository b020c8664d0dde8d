"""The admin's side of block repair, fed by heartbeat answers (the push itself is tested with
real node processes in tests/integration/test_block_integrity.py)."""

from __future__ import annotations

import asyncio
import shutil

from tiktrue.control import network_manager as nm
from tiktrue.control.block_repair import BlockRepairs
from tiktrue.model.store import BlockStore
from tiktrue.security.node_tls import node_identity


def test_each_change_is_told_once_and_a_damaged_source_says_how_to_mend_it(tiny_llama, tmp_path):
    home = tmp_path / "admin"
    store = BlockStore(shutil.copytree(tiny_llama.root, home / "models" / tiny_llama.model_id))
    nm.create_network(home, "A", store, network_id="net-a")
    admin_id = node_identity(home).node_id
    store.block_path("layer_2").write_bytes(b"damaged")
    told: list[tuple[str, dict]] = []
    repairs = BlockRepairs(home, admin_id, lambda name, **fields: told.append((name, fields)))
    damaged = {"block_faults": {"layer_2": "does not match its sha256"}, "loaded": True}

    async def beats() -> None:
        for _ in range(3):  # the same report, beat after beat: one event, one repair
            repairs.on_beat("net-a", "worker-1", damaged)
        await asyncio.gather(*repairs._tasks.values())
        repairs.on_beat("net-a", "worker-1", {"block_faults": {}})
        repairs.on_beat("net-a", "worker-1", {"block_faults": {}})
        repairs.on_beat("net-a", admin_id, damaged)  # the admin's own node logs its own
        await repairs.stop()

    asyncio.run(beats())
    names = [name for name, _ in told]
    assert names == ["block_corrupt", "block_repair_failed", "block_repaired"], told
    corrupt, failed = told[0][1], told[1][1]
    assert corrupt["blocks"] == {"layer_2": "does not match its sha256"} and corrupt["serving"]
    assert corrupt["level"] == "error" and corrupt["node_id"] == "worker-1"
    assert "admin's own copy of layer_2" in failed["message"]
    assert "tiktrue models download" in failed["message"] and failed["retry_in_s"] > 0
