"""``tiktrue admin backup FILE`` / ``tiktrue admin restore FILE``: the admin PC's state in one
passphrase-encrypted file, and back on another PC.

What the file holds (a tar archive sealed by ``security.backup_crypto``):

- the node's identity (``identity/node_key.pem``): the restored PC *is* the admin node, so
  every other node goes on trusting it (its node id, its certificates) without joining again;
- every network of the node (``networks/<id>/``: the network's CA key and certificate, the
  node's certificate, the block key, join tokens and requests) and its config
  (``network_config_<id>.json``);
- ``tiktrue.db`` (accounts, API keys, rate-limit usage, conversations and their token
  histories), copied with SQLite's online backup (consistent while the node runs), and the
  JWT secret (logins stay valid), the gateway's settings and the node's caps.

Not in it: the models (big, and anywhere: import or download them again on the new PC), the
logs, the KV caches (a conversation's next turn rebuilds them by replaying its history, with
the same answer), this PC's browser sessions.

A restore goes into a data dir whose node service is stopped. It refuses one that is in a
network or holds accounts already, unless ``force``: then what it would replace is moved
aside to ``<data>/before-restore-<time>/`` first (a restore loses nothing). When the restored
node starts, at its new address, it tells its networks where it is now (``control.
admin_address``): the other nodes follow it, and conversations continue.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import psutil

from tiktrue import __version__
from tiktrue.database import DB_NAME
from tiktrue.model.store import MANIFEST as MODEL_MANIFEST
from tiktrue.paths import run_file
from tiktrue.protocol.network_config import CONFIG_PREFIX, NetworkConfig
from tiktrue.security.auth_manager import _write_private_file
from tiktrue.security.backup_crypto import BackupCryptoError, seal, unseal
from tiktrue.security.node_tls import node_identity

MANIFEST = "backup.json"
# beside the networks and the database: what else a node keeps that the backup restores
SETTINGS = ("jwt_secret", "gateway.json", "caps.json")
KEY_FILES = ("node_key.pem", "control_cert.pem")  # in identity/
MAX_MEMBER_BYTES = 1 << 31


class BackupError(Exception):
    """A backup or restore that cannot go ahead; the message says why and what to do."""


@dataclass
class BackupSummary:
    """What a backup holds (its ``backup.json``), shown by both commands."""

    node_id: str
    networks: dict[str, dict] = field(default_factory=dict)  # id -> name, role, model, version
    accounts: int = 0
    conversations: int = 0
    created: float = 0.0
    version: str = __version__
    files: list[str] = field(default_factory=list)

    def describe(self) -> str:
        nets = ", ".join(
            f"{i} ({n['name']}, {n['role']}, {n['model_id']}, config v{n['version']})"
            for i, n in self.networks.items()
        )
        return (
            f"node {self.node_id}; networks: {nets or 'none'}; {self.accounts} account(s), "
            f"{self.conversations} conversation(s)"
        )


def node_running(data_dir: Path) -> int | None:
    """The pid of the node service running from ``data_dir``, if one runs."""
    try:
        pid = int(json.loads(run_file(data_dir).read_text("utf-8"))["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if psutil.pid_exists(pid) and pid != os.getpid() else None


# --- backup ------------------------------------------------------------------------------------


def _database_copy(data_dir: Path, into: Path) -> tuple[int, int]:
    """A consistent copy of ``tiktrue.db`` (SQLite's online backup: the running node may be
    writing); the number of accounts and conversations in it."""
    source = sqlite3.connect(Path(data_dir) / DB_NAME, timeout=30)
    target = sqlite3.connect(into)
    try:
        source.backup(target)
        counts = []
        for table in ("users", "sessions"):
            try:
                counts.append(target.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
            except sqlite3.OperationalError:  # no such table: none yet
                counts.append(0)
        return counts[0], counts[1]
    finally:
        target.close()
        source.close()


def _gather(data_dir: Path, scratch: Path) -> tuple[dict[str, Path], BackupSummary]:
    identity = node_identity(data_dir)
    summary = BackupSummary(node_id=identity.node_id, created=time.time())
    files: dict[str, Path] = {}
    for name in KEY_FILES:
        if (identity.directory / name).is_file():
            files[f"identity/{name}"] = identity.directory / name
    networks = data_dir / "networks"
    for path in sorted(networks.rglob("*")) if networks.is_dir() else []:
        if path.is_file() and not path.name.endswith(".partial"):
            files[path.relative_to(data_dir).as_posix()] = path
    for path in sorted(data_dir.glob(f"{CONFIG_PREFIX}*.json")):
        config = NetworkConfig.model_validate_json(path.read_text("utf-8"))
        entry = next((n for n in config.nodes if n.node_id == identity.node_id), None)
        summary.networks[config.network_id] = {
            "name": config.name,
            "role": entry.role if entry else "none",
            "model_id": config.model_id,
            "version": config.version,
        }
        files[path.name] = path
    for name in SETTINGS:
        if (data_dir / name).is_file():
            files[name] = data_dir / name
    if (data_dir / DB_NAME).is_file():
        copy = scratch / DB_NAME
        summary.accounts, summary.conversations = _database_copy(data_dir, copy)
        files[DB_NAME] = copy
    summary.files = sorted(files)
    return files, summary


def write_backup(data_dir: Path, target: Path, passphrase: str, *, force: bool = False):
    """Seal this node's state into ``target`` (owner-only; refuses to replace a file unless
    ``force``); returns its ``BackupSummary``."""
    data_dir, target = Path(data_dir), Path(target)
    if target.exists() and not force:
        raise BackupError(f"{target} exists; choose another name, or --force to replace it")
    if not target.parent.is_dir():
        raise BackupError(f"{target.parent} is not a folder")
    with tempfile.TemporaryDirectory(prefix="tiktrue-backup-") as tmp:
        files, summary = _gather(data_dir, Path(tmp))
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            _add_bytes(archive, MANIFEST, json.dumps(summary.__dict__, indent=2).encode())
            for name, path in files.items():
                _add_bytes(archive, name, path.read_bytes())
    try:
        sealed = seal(buffer.getvalue(), passphrase)
    except BackupCryptoError as exc:
        raise BackupError(str(exc)) from None
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    _write_private_file(partial, sealed)
    partial.replace(target)
    return summary


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
    archive.addfile(info, io.BytesIO(data))


# --- restore ---------------------------------------------------------------------------------


@dataclass
class Backup:
    """An opened backup: its summary and files (path in the data dir -> bytes)."""

    summary: BackupSummary
    files: dict[str, bytes]


def _allowed(name: str) -> bool:
    """Only what a backup writes: no absolute path, no '..', nothing else of the data dir."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return False
    top = path.parts[0]
    return (
        (top == "identity" and len(path.parts) == 2 and path.name in KEY_FILES)
        or (top == "networks" and len(path.parts) >= 3)
        or (len(path.parts) == 1 and path.name.startswith(CONFIG_PREFIX))
        or (len(path.parts) == 1 and path.name in (*SETTINGS, DB_NAME))
    )


def read_backup(source: Path, passphrase: str) -> Backup:
    """Open a backup file; raises ``BackupError`` (wrong passphrase, damaged, not a backup)."""
    try:
        blob = Path(source).read_bytes()
    except OSError as exc:
        raise BackupError(f"cannot read {source}: {exc.strerror or exc}") from None
    try:
        archive_bytes = unseal(blob, passphrase)
    except BackupCryptoError as exc:
        raise BackupError(f"{source}: {exc}") from None
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(archive_bytes), mode="r:gz") as archive:
            for member in archive.getmembers():
                if not member.isfile() or member.size > MAX_MEMBER_BYTES:
                    raise BackupError(f"{source} holds something a backup never does")
                if member.name != MANIFEST and not _allowed(member.name):
                    raise BackupError(f"{source} holds {member.name!r}, which no backup writes")
                handle = archive.extractfile(member)
                files[member.name] = handle.read() if handle else b""
        manifest = json.loads(files.pop(MANIFEST))
        summary = BackupSummary(**{k: manifest[k] for k in BackupSummary.__dataclass_fields__})
    except (tarfile.TarError, KeyError, ValueError, TypeError) as exc:
        raise BackupError(f"{source} is damaged inside: {exc}") from None
    if "identity/node_key.pem" not in files:
        raise BackupError(f"{source} holds no node identity")
    return Backup(summary, files)


def _in_use(data_dir: Path) -> list[str]:
    """What of ``data_dir`` a restore would replace and someone may want: its networks and
    its accounts and conversations."""
    found = [p.name for p in sorted(data_dir.glob(f"{CONFIG_PREFIX}*.json"))]
    db = data_dir / DB_NAME
    if db.is_file():
        try:
            with tempfile.TemporaryDirectory(prefix="tiktrue-restore-") as tmp:
                accounts = _database_copy(data_dir, Path(tmp) / DB_NAME)
        except sqlite3.DatabaseError:
            accounts = (1, 0)  # unreadable: still someone's
        if any(accounts):
            found.append(f"{DB_NAME} ({accounts[0]} accounts, {accounts[1]} conversations)")
    return found


def _move_aside(data_dir: Path, names: list[str]) -> Path | None:
    """Move what a restore replaces into ``<data>/before-restore-<time>/``."""
    present = [n for n in names if (data_dir / n).exists()]
    if not present:
        return None
    aside = data_dir / time.strftime("before-restore-%Y%m%d-%H%M%S")
    for name in present:
        (aside / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(data_dir / name), str(aside / name))
    return aside


def restore_backup(data_dir: Path, backup: Backup, *, force: bool = False) -> Path | None:
    """Write ``backup`` into ``data_dir`` (see the module); returns where replaced files went
    (None: nothing was there). Raises ``BackupError`` without writing anything."""
    data_dir = Path(data_dir)
    pid = node_running(data_dir)
    if pid is not None:
        raise BackupError(
            f"the node service runs from {data_dir} (pid {pid}): stop it first (close the "
            "app, or stop the service), then restore"
        )
    in_use = _in_use(data_dir)
    if in_use and not force:
        raise BackupError(
            f"{data_dir} is in use: {', '.join(in_use)}. Restore into a fresh data dir, or "
            "with --force, which moves these aside (to before-restore-<time>/) first"
        )
    replaced = [
        "identity",
        "networks",
        *[p.name for p in data_dir.glob(f"{CONFIG_PREFIX}*.json")],
        *SETTINGS,
        DB_NAME,
        f"{DB_NAME}-wal",
        f"{DB_NAME}-shm",
    ]
    aside = _move_aside(data_dir, replaced)
    for name, data in sorted(backup.files.items()):
        path = data_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if os.name != "nt" and path.parent.name in ("identity", "ca"):
            path.parent.chmod(0o700)
        _write_private_file(path, data)
    return aside


def missing_models(data_dir: Path, backup: Backup) -> list[str]:
    """The models the restored networks run that this PC does not hold yet."""
    wanted = {n["model_id"] for n in backup.summary.networks.values()}
    return sorted(
        m for m in wanted if not (Path(data_dir) / "models" / m / MODEL_MANIFEST).is_file()
    )
