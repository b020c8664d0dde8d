"""The gateway over HTTPS, in this process: a node in no network serves a self-signed
certificate of its own key; once it is in a network, the certificate from that network's CA,
loaded into the running server; nothing answers in clear on the HTTPS port; ``/tls/ca.crt``
gives what a browser must trust, with the fingerprint the UI shows."""

from __future__ import annotations

import asyncio
import ssl

import httpx
import pytest

from tiktrue.control import network_manager as nm
from tiktrue.control.cert_renewal import renew
from tiktrue.security.gateway_tls import client_context, fingerprint
from tiktrue.security.node_tls import pem_to_der
from tiktrue.service.service_runner import NodeService


def _trusting(pem: bytes) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=pem.decode())
    return context


async def _get(url: str, verify) -> httpx.Response:
    async with httpx.AsyncClient(verify=verify, timeout=30) as client:
        return await client.get(url)


def test_https_before_and_after_the_node_joins_a_network(tiny_llama, tmp_path):
    home = tmp_path / "pc"

    async def go() -> None:
        # HTTPS forced on loopback: the LAN case (the default off loopback) on one PC
        service = NodeService(home, host="127.0.0.1", announce=False, api_port=0, gateway_tls=True)
        await service.start()
        try:
            base = service.api_url.removesuffix("/v1")
            assert base.startswith("https://127.0.0.1:")
            port = base.rsplit(":", 1)[1]

            # no network yet: its own certificate, self-signed; a person fetches it once
            # (clicking through the browser's warning) and checks the fingerprint
            fetched = await _get(f"{base}/tls/ca.crt", False)
            assert fetched.status_code == 200
            info = (await _get(f"{base}/tls/info", False)).json()
            assert info["tls"]["kind"] == "self-signed" and info["tls"]["network_id"] is None
            assert info["tls"]["ca_fingerprint"] == fingerprint(fetched.content)
            assert service.node_info()["gateway"]["tls"] == info["tls"]
            own = _trusting(fetched.content)
            assert (await _get(f"{base}/health", own)).json()["status"] == "ok"
            with pytest.raises(httpx.ConnectError):  # an unknown certificate is refused
                await _get(f"{base}/health", _trusting(_other_ca(tmp_path)))

            # nothing in clear on that port: the API, the login and the UI never answer
            for path in ("/health", "/v1/models", "/login", "/auth/login"):
                with pytest.raises(httpx.TransportError):
                    await _get(f"http://127.0.0.1:{port}{path}", True)

            # the PC creates a network: the network CA's certificate, in the running server
            nm.create_network(home, "Office", tiny_llama, network_id="office")
            await service.reload()
            ca = (home / "networks" / "office" / "ca_cert.pem").read_bytes()
            info = (await _get(f"{base}/tls/info", _trusting(ca))).json()
            assert info["tls"]["kind"] == "network" and info["tls"]["network_id"] == "office"
            assert info["tls"]["ca_fingerprint"] == fingerprint(ca)
            assert (await _get(f"{base}/tls/ca.crt", _trusting(ca))).content == ca
            # tiktrue chat's trust: the CAs of this PC's networks
            health = await _get(f"{base}/health", client_context(home))
            assert health.json()["status"] == "ok"
            with pytest.raises(httpx.ConnectError):  # the self-signed one is served no more
                await _get(f"{base}/health", own)

            # its certificate renewed (the admin's own CA signs it): served from then on
            before = await asyncio.to_thread(_served, int(port), ca)
            await renew(home, "office")
            service._certificate_renewed("office")
            now = (home / "networks" / "office" / "node_cert.pem").read_bytes()
            assert before != pem_to_der(now)
            assert await asyncio.to_thread(_served, int(port), ca) == pem_to_der(now)
        finally:
            await service.stop()

    asyncio.run(go())


def _served(port: int, ca: bytes) -> bytes:
    """The certificate the gateway shows a new connection (DER)."""
    import socket

    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        _trusting(ca).wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return tls.getpeercert(binary_form=True)


def _other_ca(tmp_path) -> bytes:
    from tiktrue.security.auth_manager import create_network_ca

    return create_network_ca("elsewhere", tmp_path / "other-ca").cert_pem
