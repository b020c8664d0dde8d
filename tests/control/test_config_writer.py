"""The one writer of a network's config, in this process: changes that come at once are
numbered one after another (none lost, none sharing a version), a change planned against an
older version is refused, a change with nothing to do writes nothing. The race with real
processes (a CLI apply against a failover) is in tests/integration/test_network.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from tests.helpers.network import import_model_from_store
from tiktrue.control import network_manager as nm
from tiktrue.control.config_signing import verify_config
from tiktrue.control.config_writer import ConfigChanged, ConfigWriter, writer_for
from tiktrue.protocol.network_config import NetworkConfig, config_path, read_config


@dataclass(frozen=True)
class Append:
    """A change that adds a letter to the network's name: what it finds is what it keeps."""

    letter: str

    def apply(self, current: NetworkConfig) -> NetworkConfig:
        return current.model_copy(update={"name": current.name + self.letter})

    def describe(self) -> str:
        return f"append {self.letter}"


@dataclass(frozen=True)
class Nothing:
    def apply(self, current: NetworkConfig) -> None:
        return None

    def describe(self) -> str:
        return "nothing"


@pytest.fixture
def admin(tiny_llama, tmp_path):
    """An admin holding its model (so its own switch verifies), alone in its network."""
    home = tmp_path / "admin"
    import_model_from_store(tiny_llama.root, home / "models")
    nm.create_network(home, "N", tiny_llama, network_id="net")
    return home


def test_changes_at_once_are_numbered_one_after_another(admin):
    written = []

    async def on_written(network_id: str) -> None:
        written.append(read_config(config_path(admin, network_id)).version)

    writer = ConfigWriter(admin, on_written=on_written)

    async def go():
        # each commit awaits inside (the switch hashes the blocks off the loop): without the
        # queue, they would all read v1 and write v2
        return await asyncio.gather(*(writer.commit("net", Append(c)) for c in "abcde"))

    configs = asyncio.run(go())
    assert [c.version for c in configs] == [2, 3, 4, 5, 6]
    assert written == [2, 3, 4, 5, 6]
    final = read_config(config_path(admin, "net"))
    assert final.version == 6 and final.name == "Nabcde"  # none lost
    verify_config(final, nm.admin_ca(admin, "net").cert_pem)  # signed by the network's CA


def test_a_change_planned_against_an_older_version_is_refused(admin):
    writer = ConfigWriter(admin)
    asyncio.run(writer.commit("net", Append("x")))  # v2, by another change
    with pytest.raises(ConfigChanged) as refused:
        asyncio.run(writer.commit("net", Append("y"), planned_against=1))
    assert (refused.value.planned_against, refused.value.current) == (1, 2)
    assert refused.value.code == "config_changed"
    assert "moved to config v2 while this change was planned against v1" in str(refused.value)
    assert read_config(config_path(admin, "net")).name == "Nx"  # nothing written over v2
    done = asyncio.run(writer.commit("net", Append("y"), planned_against=2))
    assert (done.version, done.name) == (3, "Nxy")


def test_a_change_with_nothing_to_do_writes_nothing(admin):
    writer = ConfigWriter(admin)
    assert asyncio.run(writer.commit("net", Nothing())) is None
    assert read_config(config_path(admin, "net")).version == 1


def test_without_a_running_service_a_command_writes_directly(admin):
    """No run file (or one left by a process that is gone): the command's own writer."""
    assert writer_for(admin).direct
    (admin / "run").mkdir(exist_ok=True)
    (admin / "run" / "node.json").write_text('{"pid": 999999999, "control": "127.0.0.1:1"}')
    assert writer_for(admin).direct
