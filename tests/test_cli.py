"""The ``tiktrue`` command line, run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

from tests.helpers.tiny_models import make_tiny_model


def tiktrue(home, *args, check=True):
    env = {**os.environ, "TIKTRUE_HOME": str(home)}
    done = subprocess.run(
        [sys.executable, "-m", "tiktrue", *args], capture_output=True, text=True, env=env
    )
    if check and done.returncode != 0:
        raise AssertionError(f"tiktrue {' '.join(args)} failed:\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def home_with_model(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    source = make_tiny_model(tmp_path_factory.mktemp("src"), "qwen2", num_layers=4)
    out = tiktrue(home, "models", "import", str(source), "--id", "tiny")
    assert "imported tiny: qwen2, 4 layers, fp32, 6 blocks" in out.stdout
    return home


def test_models_list_show_verify(home_with_model):
    listing = tiktrue(home_with_model, "models", "list").stdout
    assert listing.split()[:3] == ["tiny", "qwen2", "4"]
    shown = tiktrue(home_with_model, "models", "show", "tiny").stdout
    assert "architecture qwen2" in shown and "layer_3" in shown
    assert (
        '"model_chain_order"' in tiktrue(home_with_model, "models", "show", "tiny", "--json").stdout
    )
    assert "all 6 blocks verified" in tiktrue(home_with_model, "models", "verify", "tiny").stdout


def test_verify_names_a_corrupted_block(tmp_path):
    source = make_tiny_model(tmp_path / "src", "llama", num_layers=2)
    tiktrue(tmp_path, "models", "import", str(source), "--id", "m")
    (tmp_path / "models" / "m" / "blocks" / "layer_1.safetensors").write_bytes(b"x")
    done = tiktrue(tmp_path, "models", "verify", "m", check=False)
    assert done.returncode == 1 and "layer_1" in done.stderr


def test_generate_streams_only_the_text_to_stdout(home_with_model):
    args = ("generate", "--model", "tiny", "--temperature", "0", "--max-tokens", "8", "Hello")
    done, again = (tiktrue(home_with_model, *args) for _ in range(2))
    assert done.stdout == again.stdout and done.stdout.strip()
    assert "tokens" not in done.stdout and "8 tokens, length" in done.stderr
    raw = tiktrue(home_with_model, "generate", "-m", "tiny", "--raw", "--seed", "1", "The quick")
    assert raw.returncode == 0


def test_generate_stats_prints_llama_cpp_like_timings_on_stderr(home_with_model):
    args = ("generate", "-m", "tiny", "--temperature", "0", "--max-tokens", "6", "--stats", "Hi")
    done = tiktrue(home_with_model, *args)
    assert "tokens per second" not in done.stdout
    lines = {line.split("=")[0].strip(): line for line in done.stderr.splitlines() if "=" in line}
    names = {"load time", "prompt eval time", "eval time", "total time", "time to first token"}
    assert names <= set(lines)
    assert " runs" in lines["eval time"] and "tokens per second" in lines["prompt eval time"]


def test_clear_errors_for_unknown_model_and_bad_settings(home_with_model):
    missing = tiktrue(home_with_model, "generate", "-m", "nope", "hi", check=False)
    assert missing.returncode == 1 and "no block store" in missing.stderr
    bad = tiktrue(home_with_model, "generate", "-m", "tiny", "--top-p", "0", "hi", check=False)
    assert bad.returncode == 1 and "top_p" in bad.stderr
    nothing = tiktrue(home_with_model, "models", "import", "/no/such/dir", "--id", "x", check=False)
    assert nothing.returncode == 1 and "does not exist" in nothing.stderr


def test_network_discover_lists_an_announced_network(loopback_multicast, tmp_path):
    """A node announcing a network on the LAN (real mDNS on 127.0.0.1): the command lists the
    node and the network. Each try listens a while; tries repeat until the node is seen."""
    from tiktrue.control.discovery import NodeAnnouncement, NodeAnnouncer

    node_id, network_id = uuid.uuid4().hex[:16], f"office-{uuid.uuid4().hex[:8]}"
    office = {"name": "Office", "role": "admin", "model_id": "m1"}
    announcement = NodeAnnouncement(
        node_id=node_id, name="cli-pc", control_port=7481, networks={network_id: office}
    )
    args = ("network", "discover", "--interface", "127.0.0.1", "--timeout")
    listen = 2.0
    with NodeAnnouncer(announcement, interfaces=["127.0.0.1"]):
        deadline = time.monotonic() + 120
        while True:
            out = tiktrue(tmp_path, *args, str(listen)).stdout
            if node_id in out or time.monotonic() > deadline:
                break
            listen = min(listen * 2, 30.0)  # a slow machine resolves slowly: listen longer
    assert f"{node_id}  cli-pc" in out and f"127.0.0.1:7481  {network_id} (admin)" in out, out
    assert f"network {network_id}: Office, 1 node\n" in out, out


def tiktrue_input(home, stdin: str, *args):
    env = {**os.environ, "TIKTRUE_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "tiktrue", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
    )


def test_users_keys_and_anonymous_access(tmp_path):
    from tiktrue.security.users import RevokedKey, UserStore

    added = tiktrue_input(tmp_path, "first password\n", "users", "add", "ada", "--password-stdin")
    assert added.returncode == 0 and "added ada (admin)" in added.stdout, added.stderr
    bob = tiktrue_input(tmp_path, "bob's password\n", "users", "add", "bob", "--password-stdin")
    assert "added bob (user)" in bob.stdout
    short = tiktrue_input(tmp_path, "short\n", "users", "add", "cy", "--password-stdin")
    assert short.returncode == 1 and "at least" in short.stderr
    listing = tiktrue(tmp_path, "users", "list").stdout.splitlines()
    assert [line.split()[:2] for line in listing] == [["ada", "admin"], ["bob", "user"]]

    made = tiktrue(tmp_path, "keys", "create", "--user", "bob", "--network", "n1", "--rpm", "5")
    key = made.stdout.strip()
    assert key.startswith("tt-") and "not shown again" in made.stderr
    store = UserStore(tmp_path, rounds=4)
    assert store.authenticate(key).networks == ("n1",)
    keys = tiktrue(tmp_path, "keys", "list").stdout
    assert key not in keys and key[:10] in keys and "active" in keys and "rpm 5" in keys
    key_id = keys.split()[0]
    assert "revoked key" in tiktrue(tmp_path, "keys", "revoke", key_id).stdout
    with pytest.raises(RevokedKey):
        store.authenticate(key)
    assert tiktrue(tmp_path, "keys", "revoke", key_id, check=False).returncode == 1

    changed = tiktrue_input(
        tmp_path, "a new password\n", "users", "passwd", "bob", "--password-stdin"
    )
    assert changed.returncode == 0
    assert store.check_password("bob", "a new password").name == "bob"
    assert "removed bob" in tiktrue(tmp_path, "users", "remove", "bob").stdout
    last = tiktrue(tmp_path, "users", "remove", "ada", check=False)
    assert last.returncode == 1 and "only admin" in last.stderr

    assert "off" in tiktrue(tmp_path, "gateway", "allow-anonymous").stdout
    assert "on" in tiktrue(tmp_path, "gateway", "allow-anonymous", "on").stdout
    assert "LAN: on" in tiktrue(tmp_path, "gateway", "allow-anonymous").stdout
    assert "off" in tiktrue(tmp_path, "gateway", "allow-anonymous", "off").stdout
    assert tiktrue(tmp_path, "gateway", "allow-anonymous", "maybe", check=False).returncode == 1


def test_without_a_node_service_network_changes_are_written_directly_and_said(tiny_llama, tmp_path):
    """No node service runs from the admin's data dir: `network approve` and `network remove`
    write the network's config themselves (each version after the last), and say so."""
    from tests.helpers.network import accept, import_model_from_store
    from tiktrue.control.join import make_join_request
    from tiktrue.control.network_manager import create_network
    from tiktrue.protocol.network_config import config_path, read_config
    from tiktrue.security.node_tls import node_identity

    admin, pc = tmp_path / "admin", tmp_path / "pc"
    import_model_from_store(tiny_llama.root, admin / "models")
    create_network(admin, "N", tiny_llama, network_id="net")
    request = make_join_request(
        pc, "net", host="127.0.0.1", block_port=7001, control_port=7002, token_secret=None
    )
    request_id = accept(admin, request)  # waits for the admin's approval
    said = "no node service runs from"
    approved = tiktrue(admin, "network", "approve", "net", request_id)
    assert said in approved.stderr and f"approved {request_id}" in approved.stdout
    node_id = node_identity(pc).node_id
    removed = tiktrue(admin, "network", "remove", "net", node_id)
    assert said in removed.stderr and "(config v3)" in removed.stdout, removed.stdout
    config = read_config(config_path(admin, "net"))
    assert config.version == 3 and node_id in config.revoked_ids
