"""Node certificates renew themselves while the node is a member of the network.

A node certificate lives ``NODE_CERT_DAYS`` (365 days). When less than a third of its life is
left (at most 30 days before its end), or when it does not name the node's address any more
(the admin restored on another PC, see ``service.admin_backup``), the node gets a new one for
the same key and role:

- the admin signs it itself (it holds the network's CA);
- a member asks its admin over the control channel (``renew_certificate``), proving itself
  with the certificate it still holds (mutual TLS and the challenge), so the admin issues only
  to a member, for the key that member proved, with the role of its certificate and the
  address the network's config records for it.

The new certificate is written whole (``install_certificate``) and loaded at once into every
live TLS context made with the old one (block servers, links, the gateway:
``node_tls.reload_certificate``): new connections show it, open ones go on. A node that stays
away until its certificate has ended can no longer prove it is a member: it joins again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tiktrue.control.join import JoinError
from tiktrue.control.network_manager import NotAdmin, admin_ca, node_cert_hosts
from tiktrue.node.control_link import ControlLink
from tiktrue.protocol.network_config import ConfigError, config_path, list_configs, read_config
from tiktrue.security.access_control import Caller
from tiktrue.security.auth_manager import (
    CLOCK_SKEW,
    NODE_CERT_DAYS,
    IdentityError,
    node_id_for_public_key,
    verify_certificate,
)
from tiktrue.security.gateway_tls import certificate_hosts
from tiktrue.security.node_tls import (
    CA_CERT,
    NODE_CERT,
    NetworkCredentials,
    install_certificate,
    node_identity,
    reload_certificate,
)

log = logging.getLogger("tiktrue.certificates")

MAX_MARGIN = dt.timedelta(days=30)
CHECK_EVERY_S = 3600.0  # at most this long between looks at the certificates
RETRY_S = 60.0  # after a failed renewal (the admin away), at most this long before the next


@dataclass(frozen=True)
class Standing:
    """What a node certificate needs, and when."""

    network_id: str
    renew_at: dt.datetime  # when it is due
    not_after: dt.datetime
    covers_host: bool  # names the node's address now

    def due(self, now: dt.datetime) -> bool:
        return now >= self.renew_at or not self.covers_host


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def renew_at(cert: x509.Certificate) -> dt.datetime:
    """When a certificate is due: a third of its life before its end, at most 30 days
    (``not_valid_before`` is set ``CLOCK_SKEW`` early by the issuer: not part of its life)."""
    life = cert.not_valid_after_utc - cert.not_valid_before_utc - CLOCK_SKEW
    margin = min(max(life, dt.timedelta(seconds=1)) / 3, MAX_MARGIN)
    return cert.not_valid_after_utc - margin


def standing(data_dir: Path, network_id: str, node_id: str) -> Standing:
    """Where ``node_id``'s certificate of the network stands (its address: the config's)."""
    pem = (Path(data_dir) / "networks" / network_id / NODE_CERT).read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    host = _entry_host(data_dir, network_id, node_id)
    return Standing(
        network_id, renew_at(cert), cert.not_valid_after_utc, host in certificate_hosts(pem)
    )


def _entry_host(data_dir: Path, network_id: str, node_id: str) -> str:
    return read_config(config_path(data_dir, network_id)).node(node_id).host


# --- the admin's side ------------------------------------------------------------------------


def issue_for_member(
    data_dir: Path, network_id: str, caller: Caller, peer_cert_der: bytes | None
) -> bytes:
    """Admin: a new certificate for the member on the other end of a control connection (its
    certificate checked there: of this network, valid, not revoked, its key proved). Same key,
    same role, the address the config gives it. Raises ``NotAdmin``, ``JoinError`` (not a
    member) or ``IdentityError``."""
    ca = admin_ca(data_dir, network_id)
    if not caller.is_member or caller.network_id != network_id or peer_cert_der is None:
        raise IdentityError("only a member of the network renews its own certificate")
    public_key = x509.load_der_x509_certificate(peer_cert_der).public_key()
    if node_id_for_public_key(public_key) != caller.node_id:  # type: ignore[arg-type]
        raise IdentityError("the certificate shown is not the caller's")
    try:
        host = _entry_host(data_dir, network_id, caller.node_id)
    except ConfigError as exc:
        raise JoinError(f"node {caller.node_id} is not in network {network_id}") from exc
    public_pem = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    log.info("network %s: renewing the certificate of node %s", network_id, caller.node_id)
    return ca.generate_node_certificate(
        caller.node_id, public_pem, caller.kind, hosts=node_cert_hosts(host), days=NODE_CERT_DAYS
    )


# --- a node's side ---------------------------------------------------------------------------


def _install(data_dir: Path, network_id: str, cert_pem: bytes) -> None:
    """Check the new certificate (this network's CA, this node's key), keep it, and load it
    into the live contexts."""
    folder = Path(data_dir) / "networks" / network_id
    ca_pem = (folder / CA_CERT).read_bytes()
    info = verify_certificate(cert_pem, ca_pem)
    me = node_identity(data_dir).node_id
    if info.node_id != me or info.network_id != network_id:
        raise IdentityError(f"the renewed certificate names {info.node_id} of {info.network_id}")
    install_certificate(data_dir, network_id, ca_pem, cert_pem)
    reload_certificate(data_dir, network_id)


async def renew(data_dir: Path, network_id: str) -> dt.datetime:
    """Get this node a new certificate of ``network_id`` now (see the module); returns its
    end. Raises what reaching the admin raises (``PeerUnavailable``, ``ControlError``, ...)."""
    credentials = NetworkCredentials.load(data_dir, network_id)
    identity = credentials.identity
    try:
        ca = admin_ca(data_dir, network_id)
    except NotAdmin:
        ca = None
    if ca is not None:
        host = _entry_host(data_dir, network_id, identity.node_id)
        cert = ca.generate_node_certificate(
            identity.node_id,
            identity.public_key,
            credentials.info.role,
            hosts=node_cert_hosts(host),
            days=NODE_CERT_DAYS,
        )
    else:
        config = read_config(config_path(data_dir, network_id))
        admin = next(n for n in config.nodes if n.role == "admin")
        async with ControlLink.to(admin, credentials) as link:
            reply = await link.call("renew_certificate", network_id=network_id)
        cert = reply["certificate"].encode()
    _install(data_dir, network_id, cert)
    ends = x509.load_pem_x509_certificate(cert).not_valid_after_utc
    log.info("network %s: certificate renewed, valid until %s", network_id, ends.isoformat())
    return ends


async def keep_renewed(
    data_dir: Path, on_renewed: Callable[[str], None], wake: asyncio.Event | None = None
) -> None:
    """The node's upkeep, for ever: renew each network's certificate when it is due (then
    ``on_renewed(network_id)``), sleeping until the next is due (at most ``CHECK_EVERY_S``,
    or until ``wake`` is set: the certificates on disk changed, a network was joined); a
    failed renewal (the admin away) is tried again within ``RETRY_S``, sooner as the end
    nears."""
    wake = wake or asyncio.Event()
    me = node_identity(data_dir).node_id
    retry_at: dict[str, dt.datetime] = {}
    while True:
        now = _now()
        next_at = now + dt.timedelta(seconds=CHECK_EVERY_S)
        for config in list_configs(data_dir):
            network_id = config.network_id
            if me not in config.node_ids:
                continue
            try:
                state = standing(data_dir, network_id, me)
            except (OSError, ValueError, ConfigError) as exc:
                log.warning("network %s: cannot read this node's certificate: %s", network_id, exc)
                continue
            if not state.due(now):
                next_at = min(next_at, state.renew_at)
                continue
            if retry_at.get(network_id, now) > now:
                next_at = min(next_at, retry_at[network_id])
                continue
            try:
                await renew(data_dir, network_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the admin away, ...: tried again before the end
                left = max((state.not_after - now) / 10, dt.timedelta(seconds=1))
                retry_at[network_id] = now + min(dt.timedelta(seconds=RETRY_S), left)
                next_at = min(next_at, retry_at[network_id])
                log.warning(
                    "network %s: certificate renewal failed (ends %s): %s",
                    network_id,
                    state.not_after.isoformat(),
                    exc,
                )
                continue
            retry_at.pop(network_id, None)
            on_renewed(network_id)
            next_at = now  # look at the new one straight away
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(wake.wait(), max(1.0, (next_at - _now()).total_seconds()))
        wake.clear()
