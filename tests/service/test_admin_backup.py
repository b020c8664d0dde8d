"""The backup file: sealed with a passphrase (scrypt + AES-256-GCM), refused when the
passphrase is wrong or anything in it changed, holding only what a backup writes; a restore
never writes over a data dir in use (unless told, and then it keeps what it replaces) nor
under a running node."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import pytest

from tiktrue.control import network_manager as nm
from tiktrue.paths import run_file
from tiktrue.security.backup_crypto import MAGIC, BackupCryptoError, seal, unseal
from tiktrue.security.node_tls import node_identity
from tiktrue.security.users import UserStore
from tiktrue.service.admin_backup import (
    BackupError,
    missing_models,
    read_backup,
    restore_backup,
    write_backup,
)

PASSPHRASE = "ده کاراکتر یا بیشتر"  # Persian: the passphrase is normalized Unicode text


def test_sealed_data_opens_only_with_its_passphrase_and_unchanged():
    blob = seal(b"the network's CA key", PASSPHRASE, n=1 << 10)
    assert blob.startswith(MAGIC) and b"CA key" not in blob
    assert unseal(blob, PASSPHRASE) == b"the network's CA key"
    with pytest.raises(BackupCryptoError, match="passphrase is wrong"):
        unseal(blob, PASSPHRASE + "!")
    for at in (len(blob) - 1, len(MAGIC) + 10, len(blob) // 2):  # tag, header, ciphertext
        changed = bytearray(blob)
        changed[at] ^= 1
        with pytest.raises(BackupCryptoError):
            unseal(bytes(changed), PASSPHRASE)
    with pytest.raises(BackupCryptoError, match="not a TikTrue backup"):
        unseal(b"PK\x03\x04 a zip file", PASSPHRASE)
    with pytest.raises(BackupCryptoError, match="at least 10 characters"):
        seal(b"x", "short")
    header = json.loads(blob[len(MAGIC) + 4 : blob.index(b"}") + 1])
    assert header["kdf"] == "scrypt" and header["cipher"] == "AES-256-GCM"


def _home(tmp_path, tiny_llama, name="admin"):
    home = tmp_path / name
    nm.create_network(home, "Office", tiny_llama, network_id="office")
    users = UserStore(home, rounds=4)
    users.add_user("boss", "a long password")
    return home


def test_backup_then_restore_into_a_fresh_data_dir(tiny_llama, tmp_path):
    home = _home(tmp_path, tiny_llama)
    file = tmp_path / "office.backup"
    summary = write_backup(home, file, PASSPHRASE)
    assert summary.node_id == node_identity(home).node_id
    assert summary.networks["office"]["role"] == "admin" and summary.accounts == 1
    assert "networks/office/ca/ca_key.pem" in summary.files
    with pytest.raises(BackupError, match="exists"):
        write_backup(home, file, PASSPHRASE)

    with pytest.raises(BackupError, match="passphrase is wrong"):
        read_backup(file, "another passphrase")
    backup = read_backup(file, PASSPHRASE)
    fresh = tmp_path / "fresh"
    node_identity(fresh)  # a PC that started once: an identity of its own, no network
    aside = restore_backup(fresh, backup)
    assert node_identity(fresh).node_id == summary.node_id
    assert (aside / "identity" / "node_key.pem").is_file()  # its own key, kept aside
    for name in ("networks/office/ca/ca_key.pem", "network_config_office.json", "jwt_secret"):
        assert (fresh / name).read_bytes() == (home / name).read_bytes()
    assert UserStore(fresh, rounds=4).login("boss", "a long password")
    assert missing_models(fresh, backup) == [tiny_llama.model_id]


def test_a_restore_keeps_off_a_data_dir_in_use_and_a_running_node(tiny_llama, tmp_path):
    home = _home(tmp_path, tiny_llama)
    write_backup(home, tmp_path / "b", PASSPHRASE)
    backup = read_backup(tmp_path / "b", PASSPHRASE)
    other = _home(tmp_path, tiny_llama, "other")  # in a network, with an account
    before = (other / "network_config_office.json").read_bytes()
    with pytest.raises(BackupError, match="in use: network_config_office.json, tiktrue.db"):
        restore_backup(other, backup)
    assert (other / "network_config_office.json").read_bytes() == before

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run_file(other).parent.mkdir(parents=True, exist_ok=True)
        run_file(other).write_text(json.dumps({"pid": sleeper.pid}))
        with pytest.raises(BackupError, match=f"pid {sleeper.pid}.*stop it first"):
            restore_backup(other, backup, force=True)
    finally:
        sleeper.kill()
        sleeper.wait()
    aside = restore_backup(other, backup, force=True)
    assert (aside / "network_config_office.json").read_bytes() == before
    assert node_identity(other).node_id == node_identity(home).node_id


def test_a_backup_holding_anything_else_is_refused(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name in ("backup.json", "identity/node_key.pem", "../outside.txt"):
            info = tarfile.TarInfo(name)
            info.size = 2
            archive.addfile(info, io.BytesIO(b"{}"))
    file = tmp_path / "evil.backup"
    file.write_bytes(seal(buffer.getvalue(), PASSPHRASE, n=1 << 10))
    with pytest.raises(BackupError, match="'../outside.txt', which no backup writes"):
        read_backup(file, PASSPHRASE)
