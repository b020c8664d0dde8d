"""Who may do what on a node: one table for the control channel, one for the block servers.

A caller is who the connection proved to be (``security.link_auth``), once per connection:

- ``anyone``: no certificate, or none proved yet: a PC that has not joined (discovery, join);
- ``owner``: this node's own identity key, i.e. whoever can read ``<data>/identity``: the
  ``tiktrue`` CLI on this PC talking to its own node service (never trusted by address: every
  user and program of a PC reaches 127.0.0.1);
- ``admin``, ``worker``, ``backup``: a certificate of a network this node belongs to, with
  that role, proved by the challenge, not expired, not revoked by the network's signed config.

The certificate's role says what a node may ask of others (only the admin pushes configs,
blocks and caps); what a node does now (in the chain, or a backup standing by) comes from the
signed config: a backup serves forward steps only while the config makes it active, which the
block server checks on its side (``serves_forward_steps``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from tiktrue.security.auth_manager import MONITOR, ROLES, CertInfo, SecurityError

ANYONE = "anyone"
OWNER = "owner"
ADMIN, WORKER, BACKUP = ROLES
CALLERS: tuple[str, ...] = (ANYONE, OWNER, *ROLES)

_ALL = frozenset(CALLERS)
_MEMBERS = frozenset(ROLES)
_ADMIN = frozenset({ADMIN})

# control operation -> the callers that may call it. An operation that names a network
# (``network_id``) takes only a certificate of that network.
CONTROL_OPS: dict[str, frozenset[str]] = {
    # what a PC that has not joined needs: the challenge, who this node is, the join handshake
    "hello": _ALL,
    "auth": _ALL,
    "node_info": _ALL,  # anyone: what discovery shows; the owner and members: everything
    "join": _ALL,
    "join_status": _ALL,
    # this PC's own CLI
    "reload": frozenset({OWNER}),
    # members of the network
    "ping": _MEMBERS | {OWNER},
    "health": _MEMBERS,  # the admin's health view (``network status`` on any member)
    "health_suspect": _MEMBERS,  # a member lost its link to a node
    "chain_broken": _MEMBERS,  # a member's chain failed
    "config_pull": _MEMBERS,  # a member back after being away asks for the config
    "block_key": _MEMBERS,  # the network's block key: only over mutual TLS, to a member
    "leave": _MEMBERS,  # a member leaves (asks with its own certificate)
    "logs": _MEMBERS | {OWNER},  # the node's recent log lines (node_logging)
    # the network's admin only
    "heartbeat": _ADMIN,
    "probe": _ADMIN,  # a 0.3 s compute benchmark: not for anyone to spam
    "blocks_held": _ADMIN,
    "manifest_push": _ADMIN,
    "chunk": _ADMIN,
    "caps_set": _ADMIN,
    "config_prepare": _ADMIN,
    "config_commit": _ADMIN,
    "config_abort": _ADMIN,
    # whitelisted tasks (node.node_tasks): the network's admin, or this PC's own CLI; the
    # node itself refuses any task not on its list
    "task_start": _ADMIN | {OWNER},
    "task_status": _ADMIN | {OWNER},
}

# operations about no network in particular; every other one names the network it acts in
# (``network_id``), and a member's certificate must be of that network
UNSCOPED_OPS = frozenset({"hello", "auth", "node_info", "join", "join_status", "ping", "probe"})

# block-server message type (``forward`` is a binary tensor frame) -> the roles that may send
# it. A block server takes only certificates of its own network (TLS), so no ``anyone``.
# Every request type of the protocol is here (a test holds it to ``MessageType``); replies
# (ack, error, hello_reply, inference_response) are not requests.
BLOCK_MESSAGES: dict[str, frozenset[str]] = {
    "hello": _MEMBERS,
    "node_auth": _MEMBERS,
    # a promoted backup keeps its backup certificate and sends steps on: every role may
    "forward": _MEMBERS,
    "session_open": _MEMBERS,
    "session_close": _MEMBERS,
    "session_save": _MEMBERS,
    "session_restore": _MEMBERS,
    "session_truncate": _MEMBERS,  # rewind (regenerate, edit and resend)
    "link_lost": _MEMBERS,
    "heartbeat": _MEMBERS,
    "inference_request": _MEMBERS,  # to a node that runs a gateway
    "cancel": _MEMBERS,
    "authentication": _MEMBERS,
}


# who may read a node's /metrics on its metrics port: a certificate of the network (members,
# or the read-only ``monitor`` certificate ``tiktrue ops prometheus`` makes for Prometheus);
# callers without one only from this PC itself (see ``node.metrics_server``)
METRICS_READERS: frozenset[str] = frozenset({*ROLES, MONITOR})


class AccessDenied(SecurityError):
    """A caller asked for something its role does not allow; ``code`` for the wire."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Caller:
    """Who is at the other end of a connection, as proved on it."""

    kind: str  # one of CALLERS
    node_id: str | None = None
    network_id: str | None = None  # the network of its certificate (members only)
    not_after: dt.datetime | None = None

    @classmethod
    def member(cls, info: CertInfo) -> Caller:
        return cls(info.role, info.node_id, info.network_id, info.not_after)

    @property
    def is_member(self) -> bool:
        return self.kind in ROLES

    def describe(self) -> str:
        if self.is_member:
            return f"{self.kind} {self.node_id} of network {self.network_id}"
        return "this node's owner" if self.kind == OWNER else "a caller without a certificate"


ANONYMOUS = Caller(ANYONE)


def check_control(op: str, caller: Caller, network_id: object = None) -> None:
    """Raises ``AccessDenied`` unless ``caller`` may call ``op`` in ``network_id`` (the
    network the request names)."""
    allowed = CONTROL_OPS.get(op)
    if allowed is None:
        raise AccessDenied("unknown_op", f"unknown control operation {op!r}")
    if caller.kind not in allowed:
        who = " or ".join(sorted(allowed))
        raise AccessDenied(
            "forbidden",
            f"{op} is for {who}; this connection proved {caller.describe()}"
            + ("" if caller.kind != ANYONE else " (present a network certificate)"),
        )
    if caller.is_member and op not in UNSCOPED_OPS and network_id != caller.network_id:
        raise AccessDenied(
            "forbidden",
            f"a certificate of network {caller.network_id} cannot act in network {network_id}",
        )


def block_messages_denied(role: str) -> frozenset[str]:
    """The block-server message types of the table that a peer with ``role`` may not send
    (computed once per connection; types outside the table are unknown, not denied)."""
    return frozenset(kind for kind, roles in BLOCK_MESSAGES.items() if role not in roles)


def serves_forward_steps(own_role: str) -> bool:
    """Whether a node whose current config gives it ``own_role`` computes forward steps: a
    backup stands by until a new config makes it active."""
    return own_role != BACKUP
