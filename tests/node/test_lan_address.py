"""Which address a node takes by default: its LAN address (the default route's interface),
checked on hosts of our own (network namespaces), and what it says about loopback."""

from __future__ import annotations

import pytest

from tests.helpers.netns import VirtualLan, lan_problem
from tiktrue.node.lan_address import LOOPBACK, choose_host, is_loopback, reach_note

PRINT_CHOICE = "from tiktrue.node.lan_address import choose_host; print(repr(choose_host()))"


def test_given_and_local_win_over_the_lan_address():
    assert choose_host("10.1.2.3").host == "10.1.2.3"
    assert choose_host("10.1.2.3").how == "given"
    local = choose_host(local=True)
    assert local.host == LOOPBACK and local.loopback
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert is_loopback(host)
    for host in ("10.0.0.5", "192.168.1.10", "0.0.0.0", "fe80::1", "pc.local"):
        assert not is_loopback(host)
    assert "other PCs cannot reach" in reach_note("127.0.0.1")
    assert reach_note("10.0.0.5") == "other PCs reach this node at 10.0.0.5"


@pytest.fixture(scope="module")
def can_make_hosts():
    problem = lan_problem()
    if problem:
        pytest.skip(f"no hosts of our own here: {problem}")


@pytest.mark.parametrize(
    ("default_route", "how"), [(True, "default route"), (False, "only LAN address")]
)
def test_a_host_whose_only_address_is_on_the_lan_takes_it(can_make_hosts, default_route, how):
    with VirtualLan(1, default_route=default_route, tag=how[0]) as lan:
        done = lan.run(0, "-c", PRINT_CHOICE)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"LanAddress(host='{lan.addresses[0]}', how='{how}')"


def test_a_host_without_a_lan_address_falls_back_to_loopback(can_make_hosts):
    with VirtualLan(0, tag="n") as lan:
        lan.names.append(lan.switch)  # the switch: loopback and a bridge, no address
        done = lan.run(0, "-c", PRINT_CHOICE)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "LanAddress(host='127.0.0.1', how='no LAN address')"
