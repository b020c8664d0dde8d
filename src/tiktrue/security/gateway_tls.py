"""The gateway's HTTPS certificate (web UI, login, OpenAI API, ``/ws``) on LAN addresses.

A node in a network serves its gateway with its certificate from that network's CA (the one
``network create`` or the join gave it: the PC's address, ``127.0.0.1`` and ``localhost`` in
its SubjectAlternativeName, server and client use, renewed before it expires), so a browser
that trusts the network's CA once trusts every gateway of the network. A node in several
networks takes the certificate of a network it administers, else of the first by id. The CA
certificate is public: the UI offers it for download, with its SHA-256 fingerprint to check
against the admin's screen before trusting it.

A node in no network yet (a PC at its first run) has no CA: it serves a self-signed
certificate of its own key (made here, for its addresses, renewed like the others), and the UI
says so: a browser warns about it, and the fingerprint is what a person can check. Other PCs
do not need this gateway before the PC is in a network: joining runs over the control
channel, which pins the admin's key by node id.

``GatewayTls`` keeps one ``ssl.SSLContext`` for the server and loads a new certificate into it
when the choice changes (a network created or joined, a renewal): new connections get it,
open ones go on.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tiktrue.security.auth_manager import (
    CLOCK_SKEW,
    IdentityError,
    NodeIdentity,
    _parse_host,
    verify_certificate,
)
from tiktrue.security.node_tls import CA_CERT, NODE_CERT, node_identity

log = logging.getLogger(__name__)

SELF_SIGNED_FILE = "gateway_self_signed.pem"  # in <data>/identity/, beside the node key
SELF_SIGNED_DAYS = 365
RENEW_SELF_SIGNED_DAYS = 30  # made again when less than this is left (or the hosts change)
NETWORK = "network"
SELF_SIGNED = "self-signed"


def fingerprint(pem: bytes) -> str:
    """SHA-256 over the certificate's DER, as browsers and OS certificate dialogs show it
    (``AB:CD:...``)."""
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def certificate_hosts(pem: bytes) -> list[str]:
    """The IP addresses and DNS names a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in names.get_values_for_type(x509.IPAddress)] + list(
        names.get_values_for_type(x509.DNSName)
    )


@dataclass(frozen=True)
class GatewayCertificate:
    """The certificate the gateway serves now, and what a browser must trust for it."""

    kind: str  # NETWORK or SELF_SIGNED
    cert_path: Path
    key_path: Path
    trust_pem: bytes  # the network CA's certificate, or the self-signed certificate itself
    network_id: str | None  # the network whose CA issued it
    cert_pem: bytes

    @property
    def trust_fingerprint(self) -> str:
        return fingerprint(self.trust_pem)

    @property
    def cert_fingerprint(self) -> str:
        return fingerprint(self.cert_pem)

    @property
    def hosts(self) -> list[str]:
        return certificate_hosts(self.cert_pem)

    @property
    def not_after(self) -> dt.datetime:
        return x509.load_pem_x509_certificate(self.cert_pem).not_valid_after_utc

    def describe(self) -> dict:
        """What the UI and ``/health``-style reports show (all public)."""
        return {
            "kind": self.kind,
            "network_id": self.network_id,
            "hosts": self.hosts,
            "not_after": self.not_after.isoformat(),
            "ca_fingerprint": self.trust_fingerprint,
            "certificate_fingerprint": self.cert_fingerprint,
        }


def _network_certificates(data_dir: Path, identity: NodeIdentity) -> list[tuple[bool, str]]:
    """(administered, network id) of every network whose certificate this node holds,
    valid now and its own."""
    found = []
    for folder in sorted((Path(data_dir) / "networks").glob("*/")):
        cert, ca = folder / NODE_CERT, folder / CA_CERT
        if not (cert.is_file() and ca.is_file()):
            continue
        try:
            info = verify_certificate(cert.read_bytes(), ca.read_bytes())
        except (IdentityError, OSError) as exc:
            log.warning("gateway: not using the certificate of %s: %s", folder.name, exc)
            continue
        if info.node_id == identity.node_id:
            found.append(((folder / "ca" / "ca_key.pem").is_file(), folder.name))
    return found


def choose_certificate(data_dir: Path, hosts: Iterable[str]) -> GatewayCertificate:
    """The certificate the gateway should serve (see the module); ``hosts``: the addresses
    it listens on, for the self-signed one."""
    data_dir = Path(data_dir)
    identity = node_identity(data_dir)
    networks = _network_certificates(data_dir, identity)
    if networks:
        administered = [n for admin, n in networks if admin]
        network_id = (administered or [n for _, n in networks])[0]
        folder = data_dir / "networks" / network_id
        cert_pem = (folder / NODE_CERT).read_bytes()
        return GatewayCertificate(
            NETWORK,
            folder / NODE_CERT,
            identity.key_path,
            (folder / CA_CERT).read_bytes(),
            network_id,
            cert_pem,
        )
    path = self_signed_certificate(identity, hosts)
    pem = path.read_bytes()
    return GatewayCertificate(SELF_SIGNED, path, identity.key_path, pem, None, pem)


def _wanted_hosts(hosts: Iterable[str]) -> list[str]:
    return list(dict.fromkeys([*[h for h in hosts if h], "127.0.0.1", "localhost"]))


def self_signed_certificate(identity: NodeIdentity, hosts: Iterable[str]) -> Path:
    """``<data>/identity/gateway_self_signed.pem`` for ``hosts`` (made again when the hosts
    change or it nears its end)."""
    path = identity.directory / SELF_SIGNED_FILE
    wanted = _wanted_hosts(hosts)
    if path.is_file():
        pem = path.read_bytes()
        left = x509.load_pem_x509_certificate(pem).not_valid_after_utc - _now()
        if set(wanted) <= set(certificate_hosts(pem)) and left > dt.timedelta(
            days=RENEW_SELF_SIGNED_DAYS
        ):
            return path
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "TikTrue"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"TikTrue node {identity.node_id}"),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(identity.public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([_parse_host(h) for h in wanted]), critical=False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(identity.public_key), critical=False
        )
        .sign(identity.private_key, hashes.SHA256())
    )
    partial = path.with_suffix(".partial")
    partial.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    partial.replace(path)
    return path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class GatewayTls:
    """The gateway's server TLS context, kept in line with ``choose_certificate``."""

    def __init__(self, data_dir: Path, hosts: Iterable[str]) -> None:
        self.data_dir = Path(data_dir)
        self.hosts = list(hosts)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_3  # as every link (DESIGN §6)
        self.certificate: GatewayCertificate | None = None
        self.refresh()

    def refresh(self) -> bool:
        """Load the certificate of the current choice if it changed; whether it did."""
        chosen = choose_certificate(self.data_dir, self.hosts)
        if self.certificate is not None and chosen.cert_pem == self.certificate.cert_pem:
            return False
        self.context.load_cert_chain(chosen.cert_path, chosen.key_path)
        self.certificate = chosen
        missing = [h for h in self.hosts if h not in chosen.hosts]
        log.info(
            "gateway HTTPS: %s certificate%s for %s (CA fingerprint %s)",
            chosen.kind,
            f" of network {chosen.network_id}" if chosen.network_id else "",
            ", ".join(chosen.hosts),
            chosen.trust_fingerprint,
        )
        if missing:
            log.warning(
                "gateway HTTPS: the certificate does not name %s: browsers will warn there",
                ", ".join(missing),
            )
        return True


def client_context(data_dir: Path | None = None, cacert: Path | None = None) -> ssl.SSLContext:
    """What a client of a gateway trusts (``tiktrue chat``): ``cacert`` (a CA certificate
    downloaded from a gateway's ``/trust`` page, or a self-signed one) when given, else the
    CAs of every network ``data_dir``'s node is in. Hostnames are checked (TLS 1.2 or newer;
    the gateway speaks 1.3)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies and checks hostnames
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    sources = [Path(cacert)] if cacert else []
    if not sources and data_dir is not None:
        sources = sorted((Path(data_dir) / "networks").glob(f"*/{CA_CERT}"))
    if not sources:
        raise IdentityError(
            "no certificate to trust for HTTPS: this PC is in no network; download the "
            "gateway's CA certificate from its /trust page and pass it (--cacert FILE)"
        )
    for source in sources:
        try:
            context.load_verify_locations(cafile=str(source))
        except (OSError, ssl.SSLError) as exc:
            raise IdentityError(f"{source} is not a readable PEM certificate: {exc}") from exc
    return context
