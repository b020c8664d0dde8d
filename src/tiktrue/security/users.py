"""People: accounts, API keys and rate limits, in the node's embedded SQLite file.

- Accounts have bcrypt password hashes and a role, ``admin`` or ``user``; the first account
  created is the admin. ``login`` returns a JWT (HS256, signed with a per-node secret kept in
  ``<data>/jwt_secret``, owner-only) that expires; a password change or the account's removal
  invalidates the JWTs issued before it.
- API keys are ``tt-`` + 43 random characters, shown once and stored as their SHA-256 (they
  carry 256 random bits: a fast hash is enough, unlike passwords). A key belongs to an account,
  may be limited to some networks and to a lifetime, and can be revoked.
- Rate limits (requests per minute and per day) hold per account and per key; a request over
  either gets :class:`RateLimited` with the seconds until its window ends. Windows are fixed
  (this minute, this UTC day), counted in the ``usage`` table so that restarts forget nothing.
- Token quotas (``tpd``: prompt and generated tokens per UTC day) hold per account and per key
  the same way: the gateway counts each answer's tokens when it ends (``count_tokens``), and
  once a day's tokens reach the quota the next request is refused with :class:`RateLimited`
  until the day ends. An answer under way is never cut: it may pass the quota by its own
  length.
- A priority class (``limits.PRIORITIES``: quick, normal, deep) may be set per account and
  per key: the default class of their requests (a request may name its own); a key's wins
  over its account's, and without either a request is ``normal``.

Tables ``users``, ``api_keys`` and ``usage`` are created here if missing; other stores of the
node keep their own tables in the same file. Every method is one short transaction; callers on
an event loop run them in a thread (bcrypt takes a fraction of a second on purpose).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import jwt

from tiktrue import limits
from tiktrue.database import Database
from tiktrue.security.auth_manager import _write_private_file

ROLES = ("admin", "user")
KEY_PREFIX = "tt-"
SECRET_FILE = "jwt_secret"
JWT_ALGORITHM = "HS256"
JWT_TTL_S = 12 * 3600
BCRYPT_ROUNDS = 12
MAX_PASSWORD_BYTES = 72  # bcrypt reads no further; longer passwords are refused, not cut
MIN_PASSWORD_CHARS = 8
WINDOWS = (("minute", 60), ("day", 86400))
DAY_S = 86400
TOKENS = "tokens"  # the usage period of token quotas (per UTC day)
_KEEP = object()  # set_user_limits: leave this limit as it is

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS users ("
    # AUTOINCREMENT: a removed account's id is never reused (its conversations stay its own)
    " id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " name TEXT NOT NULL UNIQUE,"
    " password_hash BLOB NOT NULL,"
    " role TEXT NOT NULL,"
    " token_epoch INTEGER NOT NULL DEFAULT 0,"
    " rpm INTEGER, rpd INTEGER,"
    " created_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS api_keys ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,"
    " key_hash TEXT NOT NULL UNIQUE,"
    " prefix TEXT NOT NULL,"
    " name TEXT,"
    " networks TEXT,"  # JSON list of network ids; NULL: every network
    " rpm INTEGER, rpd INTEGER,"
    " created_at REAL NOT NULL,"
    " expires_at REAL,"
    " revoked_at REAL)",
    "CREATE TABLE IF NOT EXISTS usage ("
    " subject TEXT NOT NULL,"  # user:<id> or key:<id>
    " period TEXT NOT NULL,"
    " start INTEGER NOT NULL,"
    " count INTEGER NOT NULL,"
    " PRIMARY KEY (subject, period, start))",
)
QUOTAS = (
    "ALTER TABLE users ADD COLUMN tpd INTEGER",  # tokens per day (prompt + generated)
    "ALTER TABLE api_keys ADD COLUMN tpd INTEGER",
)
PRIORITY_DEFAULTS = (  # the default class of requests (NULL: none set here)
    "ALTER TABLE users ADD COLUMN priority TEXT",
    "ALTER TABLE api_keys ADD COLUMN priority TEXT",
)


class UserError(Exception):
    """A refusal about accounts, keys or limits; ``code`` says which (for APIs and tests)."""

    code = "user_error"
    status = 400  # the HTTP status the gateway answers it with

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidCredentials(UserError):
    """A wrong password, an unknown account, or a key or JWT that is not (or no longer) valid."""

    code = "invalid_credentials"
    status = 401


class ExpiredCredentials(InvalidCredentials):
    code = "credentials_expired"


class RevokedKey(InvalidCredentials):
    code = "key_revoked"


class Forbidden(UserError):
    """Valid credentials that do not reach this (another network, an admin operation)."""

    code = "forbidden"
    status = 403


class RateLimited(UserError):
    code = "rate_limited"
    status = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotFound(UserError):
    code = "not_found"
    status = 404


class Conflict(UserError):
    code = "conflict"
    status = 409


@dataclass(frozen=True)
class User:
    id: int
    name: str
    role: str
    created_at: float
    rpm: int | None = None
    rpd: int | None = None
    tpd: int | None = None
    priority: str | None = None  # the default class of its requests (None: normal)


@dataclass(frozen=True)
class ApiKey:
    id: int
    user_id: int
    user_name: str
    prefix: str  # the key's first characters, to recognise it in a list
    name: str | None
    networks: tuple[str, ...] | None  # None: every network
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    rpm: int | None = None
    rpd: int | None = None
    tpd: int | None = None
    priority: str | None = None  # the default class of its requests (None: its account's)

    def state(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: an account (by JWT or by one of its keys), or nobody."""

    user_id: int | None = None
    user_name: str | None = None
    role: str | None = None
    key_id: int | None = None
    networks: tuple[str, ...] | None = None  # the key's scope; None: every network
    priority: str | None = None  # the key's default class, else the account's (None: normal)

    def priority_of(self, asked: str | None) -> str:
        """A request's class: the one it names, else this caller's default, else normal."""
        return asked or self.priority or limits.DEFAULT_PRIORITY

    @property
    def anonymous(self) -> bool:
        return self.user_id is None

    @property
    def owner(self) -> str | None:
        """Whose conversations these are: the account (all its keys and logins), or None for
        callers without credentials."""
        return None if self.user_id is None else f"user:{self.user_id}"

    def allows(self, network_id: str) -> bool:
        return self.networks is None or network_id in self.networks


ANONYMOUS = Principal()


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _check_password(password: str) -> bytes:
    raw = password.encode("utf-8")
    if len(password) < MIN_PASSWORD_CHARS:
        raise UserError(f"a password needs at least {MIN_PASSWORD_CHARS} characters")
    if len(raw) > MAX_PASSWORD_BYTES:
        raise UserError(f"a password may have at most {MAX_PASSWORD_BYTES} bytes (UTF-8)")
    return raw


def _check_priority(value: str | None) -> str | None:
    if value is not None and value not in limits.PRIORITIES:
        raise UserError(
            f"a priority class is one of {', '.join(limits.PRIORITIES)} (or unset), not {value!r}"
        )
    return value


def _check_limit(value: int | None, what: str) -> int | None:
    if value is not None and value < 1:
        raise UserError(f"{what} must be at least 1 (or unset: no limit)")
    return value


class UserStore:
    """Accounts, API keys and usage in ``<data>/tiktrue.db``.

    ``clock`` gives the time (seconds since the epoch): tests move it instead of sleeping.
    ``rounds`` is bcrypt's cost (2**rounds iterations); tests use the minimum, 4.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        clock: Callable[[], float] = time.time,
        rounds: int = BCRYPT_ROUNDS,
        jwt_ttl_s: float = JWT_TTL_S,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.rounds = rounds
        self.jwt_ttl_s = jwt_ttl_s
        self.db = Database.open(self.data_dir)
        self.db.migrate("users", [SCHEMA, QUOTAS, PRIORITY_DEFAULTS])
        self._secret = self._load_secret()
        # checking a password of an unknown account costs as much as a known one's
        self._dummy_hash = bcrypt.hashpw(b"not a password", bcrypt.gensalt(self.rounds))

    def _load_secret(self) -> bytes:
        path = self.data_dir / SECRET_FILE
        if not path.exists():
            with contextlib.suppress(FileExistsError):  # another process made it first
                _write_private_file(path, secrets.token_hex(32).encode("ascii"))
        secret = path.read_bytes().strip()
        if len(secret) < 32:
            raise UserError(f"{path} is too short to sign tokens; delete it to make a new one")
        return secret

    def close(self) -> None:
        self.db.close()

    # --- accounts ---------------------------------------------------------------------------

    def add_user(
        self,
        name: str,
        password: str,
        role: str | None = None,
        *,
        rpm: int | None = None,
        rpd: int | None = None,
        tpd: int | None = None,
        priority: str | None = None,
    ) -> User:
        """A new account; the first one is the admin (``role`` None: admin if first, else
        user)."""
        name = name.strip()
        if not name or len(name) > 64 or not name.isprintable():
            raise UserError("an account name is 1 to 64 printable characters")
        if role is not None and role not in ROLES:
            raise UserError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        hashed = bcrypt.hashpw(_check_password(password), bcrypt.gensalt(self.rounds))
        with self.db.transaction() as conn:
            first = conn.execute("SELECT COUNT(*) FROM users").fetchone()[0] == 0
            role = "admin" if first else (role or "user")
            try:
                cursor = conn.execute(
                    "INSERT INTO users (name, password_hash, role, rpm, rpd, tpd, priority,"
                    " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        name,
                        hashed,
                        role,
                        _check_limit(rpm, "rpm"),
                        _check_limit(rpd, "rpd"),
                        _check_limit(tpd, "tpd"),
                        _check_priority(priority),
                        self.clock(),
                    ),
                )
            except sqlite3.IntegrityError:
                raise Conflict(f"an account named {name!r} exists already") from None
        return self.user(cursor.lastrowid)

    def user(self, ref: int | str) -> User:
        """An account by id or by name."""
        column = "id" if isinstance(ref, int) else "name"
        rows = self.db.query(f"SELECT * FROM users WHERE {column} = ?", (ref,))
        if not rows:
            raise NotFound(f"no account {ref!r}")
        return _user(rows[0])

    def list_users(self) -> list[User]:
        return [_user(r) for r in self.db.query("SELECT * FROM users ORDER BY id")]

    def remove_user(self, name: str) -> None:
        """Remove an account, its keys and its usage; its JWTs stop working. The last admin
        stays (someone must be able to manage the others)."""
        user = self.user(name)
        with self.db.transaction() as conn:
            if user.role == "admin":
                admins = conn.execute("SELECT COUNT(*) FROM users WHERE role = 'admin'").fetchone()
                if admins[0] <= 1:
                    raise Conflict(f"{name!r} is the only admin; make another admin first")
            keys = [
                r[0] for r in conn.execute("SELECT id FROM api_keys WHERE user_id = ?", (user.id,))
            ]
            conn.execute("DELETE FROM api_keys WHERE user_id = ?", (user.id,))
            conn.execute("DELETE FROM users WHERE id = ?", (user.id,))
            subjects = [f"user:{user.id}", *(f"key:{k}" for k in keys)]
            conn.executemany("DELETE FROM usage WHERE subject = ?", [(s,) for s in subjects])

    def set_password(self, name: str, password: str) -> None:
        """A new password; JWTs issued before it stop working."""
        hashed = bcrypt.hashpw(_check_password(password), bcrypt.gensalt(self.rounds))
        with self.db.transaction() as conn:
            done = conn.execute(
                "UPDATE users SET password_hash = ?, token_epoch = token_epoch + 1 WHERE name = ?",
                (hashed, name),
            )
            if done.rowcount == 0:
                raise NotFound(f"no account {name!r}")

    def set_user_limits(
        self, name: str, *, rpm: int | None, rpd: int | None, tpd: int | None = _KEEP
    ) -> User:
        """An account's rate limits, and its token quota when ``tpd`` is given (None: none)."""
        current = self.user(name)
        tpd = current.tpd if tpd is _KEEP else tpd
        with self.db.transaction() as conn:
            done = conn.execute(
                "UPDATE users SET rpm = ?, rpd = ?, tpd = ? WHERE name = ?",
                (
                    _check_limit(rpm, "rpm"),
                    _check_limit(rpd, "rpd"),
                    _check_limit(tpd, "tpd"),
                    name,
                ),
            )
            if done.rowcount == 0:
                raise NotFound(f"no account {name!r}")
        return self.user(name)

    def set_user_priority(self, name: str, priority: str | None) -> User:
        """The default class of the account's requests (None: normal), for the keys that
        set none of their own."""
        with self.db.transaction() as conn:
            done = conn.execute(
                "UPDATE users SET priority = ? WHERE name = ?", (_check_priority(priority), name)
            )
            if done.rowcount == 0:
                raise NotFound(f"no account {name!r}")
        return self.user(name)

    def set_key_priority(self, key_id: int, priority: str | None) -> ApiKey:
        """The default class of the key's requests (None: its account's)."""
        with self.db.transaction() as conn:
            done = conn.execute(
                "UPDATE api_keys SET priority = ? WHERE id = ?",
                (_check_priority(priority), key_id),
            )
            if done.rowcount == 0:
                raise NotFound(f"no API key {key_id}")
        return self.key(key_id)

    def set_key_quota(self, key_id: int, tpd: int | None) -> ApiKey:
        """A key's token quota per day (None: none beyond its account's)."""
        with self.db.transaction() as conn:
            done = conn.execute(
                "UPDATE api_keys SET tpd = ? WHERE id = ?", (_check_limit(tpd, "tpd"), key_id)
            )
            if done.rowcount == 0:
                raise NotFound(f"no API key {key_id}")
        return self.key(key_id)

    def check_password(self, name: str, password: str) -> User:
        rows = self.db.query("SELECT * FROM users WHERE name = ?", (name,))
        stored = rows[0]["password_hash"] if rows else self._dummy_hash
        try:
            ok = bcrypt.checkpw(password.encode("utf-8"), stored)
        except ValueError:  # longer than bcrypt reads: never a valid password here
            ok = False
        if not rows or not ok:
            raise InvalidCredentials("wrong account name or password")
        return _user(rows[0])

    # --- JWT ------------------------------------------------------------------------------

    def login(self, name: str, password: str) -> str:
        """A JWT for the account, valid ``jwt_ttl_s`` seconds."""
        user = self.check_password(name, password)
        epoch = self.db.query("SELECT token_epoch FROM users WHERE id = ?", (user.id,))[0][0]
        now = self.clock()
        claims = {
            "sub": str(user.id),
            "name": user.name,
            "role": user.role,
            "epoch": epoch,
            "iat": int(now),
            "exp": int(now + self.jwt_ttl_s),
        }
        return jwt.encode(claims, self._secret, algorithm=JWT_ALGORITHM)

    def verify_token(self, token: str) -> Principal:
        """The account a JWT was issued to, while it has not expired and the account still has
        the password it had then."""
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[JWT_ALGORITHM],
                options={"verify_exp": False, "require": ["sub", "exp", "epoch"]},
            )
        except jwt.PyJWTError as exc:
            raise InvalidCredentials(f"not a valid token: {exc}") from None
        if self.clock() >= claims["exp"]:  # our clock, not PyJWT's: tests move it
            raise ExpiredCredentials("the token has expired; log in again")
        rows = self.db.query("SELECT * FROM users WHERE id = ?", (int(claims["sub"]),))
        if not rows or rows[0]["token_epoch"] != claims["epoch"]:
            raise InvalidCredentials("the token's account was removed or changed its password")
        user = _user(rows[0])
        return Principal(user.id, user.name, user.role, priority=user.priority)

    # --- API keys -------------------------------------------------------------------------

    def create_key(
        self,
        user: str,
        *,
        name: str | None = None,
        networks: Sequence[str] | None = None,
        expires_in_s: float | None = None,
        rpm: int | None = None,
        rpd: int | None = None,
        tpd: int | None = None,
        priority: str | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key for ``user``: returns its record and the key itself (shown this once)."""
        owner = self.user(user)
        if expires_in_s is not None and expires_in_s <= 0:
            raise UserError("a key's lifetime must be positive")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        now = self.clock()
        with self.db.transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO api_keys (user_id, key_hash, prefix, name, networks, rpm, rpd,"
                " tpd, priority, created_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    owner.id,
                    hash_key(key),
                    key[:10],
                    name,
                    json.dumps(sorted(set(networks))) if networks else None,
                    _check_limit(rpm, "rpm"),
                    _check_limit(rpd, "rpd"),
                    _check_limit(tpd, "tpd"),
                    _check_priority(priority),
                    now,
                    None if expires_in_s is None else now + expires_in_s,
                ),
            )
        return self.key(cursor.lastrowid), key

    def key(self, key_id: int) -> ApiKey:
        rows = self.db.query(_KEYS + " WHERE k.id = ?", (key_id,))
        if not rows:
            raise NotFound(f"no API key {key_id}")
        return _key(rows[0])

    def list_keys(self, user: str | None = None) -> list[ApiKey]:
        if user is None:
            return [_key(r) for r in self.db.query(_KEYS + " ORDER BY k.id")]
        owner = self.user(user)
        return [
            _key(r)
            for r in self.db.query(_KEYS + " WHERE k.user_id = ? ORDER BY k.id", (owner.id,))
        ]

    def revoke_key(self, key_id: int) -> ApiKey:
        with self.db.transaction() as conn:
            done = conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (self.clock(), key_id),
            )
        key = self.key(key_id)  # NotFound when there is no such key
        if done.rowcount == 0:
            raise Conflict(f"API key {key_id} was revoked already")
        return key

    def verify_key(self, key: str) -> tuple[Principal, ApiKey]:
        rows = self.db.query(_KEYS + " WHERE k.key_hash = ?", (hash_key(key),))
        if not rows:
            raise InvalidCredentials("unknown API key")
        record = _key(rows[0])
        state = record.state(self.clock())
        if state == "revoked":
            raise RevokedKey("this API key was revoked")
        if state == "expired":
            raise ExpiredCredentials("this API key has expired")
        priority = record.priority or rows[0]["user_priority"]
        return Principal(
            record.user_id, record.user_name, rows[0]["role"], record.id, record.networks, priority
        ), record

    def authenticate(self, credential: str) -> Principal:
        """An API key (``tt-...``) or a JWT, as sent in ``Authorization: Bearer``."""
        credential = credential.strip()
        if credential.startswith(KEY_PREFIX):
            return self.verify_key(credential)[0]
        return self.verify_token(credential)

    # --- rate limits ------------------------------------------------------------------------

    def hit(self, principal: Principal) -> None:
        """Count one request of ``principal`` against its account's and its key's limits, or
        refuse it with :class:`RateLimited` (nothing is counted then): over a rate limit, or
        with the day's token quota used up. Anonymous callers have no limits here."""
        if principal.anonymous:
            return
        now = self.clock()
        with self.db.transaction() as conn:
            user = conn.execute(
                "SELECT rpm, rpd, tpd FROM users WHERE id = ?", (principal.user_id,)
            ).fetchone()
            if user is None:
                raise InvalidCredentials("the account was removed")
            limits = [(f"user:{principal.user_id}", "this account", user)]
            if principal.key_id is not None:
                key = conn.execute(
                    "SELECT rpm, rpd, tpd FROM api_keys WHERE id = ?", (principal.key_id,)
                ).fetchone()
                if key is not None:
                    limits.append((f"key:{principal.key_id}", "this API key", key))
            for subject, who, set_limits in limits:
                _check_quota(conn, subject, who, set_limits["tpd"], now)
            counted = []
            for subject, who, set_limits in limits:
                rpm, rpd = set_limits["rpm"], set_limits["rpd"]
                for (window, length), limit in zip(WINDOWS, (rpm, rpd), strict=True):
                    if limit is None:
                        continue
                    start = int(now // length * length)
                    row = conn.execute(
                        "SELECT count FROM usage WHERE subject = ? AND period = ? AND start = ?",
                        (subject, window, start),
                    ).fetchone()
                    if row is not None and row[0] >= limit:
                        retry = max(1, math.ceil(start + length - now))
                        raise RateLimited(
                            f"{who} may make {limit} requests per {window}; retry in {retry} s",
                            retry,
                        )
                    counted.append((subject, window, start))
            conn.executemany(
                "INSERT INTO usage (subject, period, start, count) VALUES (?, ?, ?, 1)"
                " ON CONFLICT(subject, period, start) DO UPDATE SET count = count + 1",
                counted,
            )
            conn.execute("DELETE FROM usage WHERE start < ?", (int(now) - 2 * 86400,))

    def count_tokens(self, principal: Principal, tokens: int) -> None:
        """An answer of ``principal`` used ``tokens`` (prompt and generated): counted against
        its account's and its key's token quotas of this UTC day."""
        if principal.anonymous or tokens <= 0:
            return
        start = int(self.clock() // DAY_S * DAY_S)
        subjects = [f"user:{principal.user_id}"]
        if principal.key_id is not None:
            subjects.append(f"key:{principal.key_id}")
        with self.db.transaction() as conn:
            conn.executemany(
                "INSERT INTO usage (subject, period, start, count) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(subject, period, start) DO UPDATE SET count = count + ?",
                [(s, TOKENS, start, tokens, tokens) for s in subjects],
            )

    def tokens_today(self, subject: str) -> int:
        """Tokens counted today for ``user:<id>`` or ``key:<id>``."""
        start = int(self.clock() // DAY_S * DAY_S)
        rows = self.db.query(
            "SELECT count FROM usage WHERE subject = ? AND period = ? AND start = ?",
            (subject, TOKENS, start),
        )
        return rows[0]["count"] if rows else 0


def _check_quota(conn: sqlite3.Connection, subject: str, who: str, tpd: int | None, now: float):
    """Refuse with :class:`RateLimited` once the day's tokens of ``subject`` reach ``tpd``."""
    if tpd is None:
        return
    start = int(now // DAY_S * DAY_S)
    row = conn.execute(
        "SELECT count FROM usage WHERE subject = ? AND period = ? AND start = ?",
        (subject, TOKENS, start),
    ).fetchone()
    if row is not None and row[0] >= tpd:
        retry = max(1, math.ceil(start + DAY_S - now))
        raise RateLimited(
            f"{who} may use {tpd} tokens per day and has used {row[0]}; retry in {retry} s",
            retry,
        )


_KEYS = (
    "SELECT k.*, u.name AS user_name, u.role AS role, u.priority AS user_priority"
    " FROM api_keys k JOIN users u ON u.id = k.user_id"
)


def _user(row: sqlite3.Row) -> User:
    return User(
        row["id"],
        row["name"],
        row["role"],
        row["created_at"],
        row["rpm"],
        row["rpd"],
        row["tpd"],
        row["priority"],
    )


def _key(row: sqlite3.Row) -> ApiKey:
    networks = tuple(json.loads(row["networks"])) if row["networks"] else None
    return ApiKey(
        id=row["id"],
        user_id=row["user_id"],
        user_name=row["user_name"],
        prefix=row["prefix"],
        name=row["name"],
        networks=networks,
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        rpm=row["rpm"],
        rpd=row["rpd"],
        tpd=row["tpd"],
        priority=row["priority"],
    )
