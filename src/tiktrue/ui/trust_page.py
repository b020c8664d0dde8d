"""Where other PCs reach this node, and how a browser comes to trust its HTTPS certificate.

``reach_card()`` is the panel the first run (``/setup``) and the admin dashboard show: the
address other PCs use (the web UI over HTTPS, the control address for joining), or a warning
when the node listens on loopback only. ``/trust`` (open to anyone: a browser needs it before
it logs in) offers the certificate to trust, the network CA's (or this PC's own, self-signed,
before it is in a network), with its SHA-256 fingerprint and how to install it once per
browser or PC.
"""

from __future__ import annotations

from nicegui import ui

from tiktrue.ui.context import ui_context
from tiktrue.ui.layout import BRAND, apply_theme, copy_text

CA_DOWNLOAD = "/tls/ca.crt"

HOW_TO = [
    (
        "Windows (Edge, Chrome)",
        "Open the downloaded file, Install Certificate…, Local Machine, Place all certificates "
        "in the following store: Trusted Root Certification Authorities. Restart the browser.",
    ),
    (
        "macOS (Safari, Chrome)",
        "Open the file in Keychain Access (System keychain), open the certificate, Trust: "
        "When using this certificate, Always Trust.",
    ),
    (
        "Linux (Chrome, Chromium)",
        "Settings, Privacy and security, Security, Manage certificates, Authorities, Import; "
        "tick Trust this certificate for identifying websites.",
    ),
    (
        "Firefox (every system)",
        "Settings, Privacy & Security, Certificates, View Certificates, Authorities, Import; "
        "tick Trust this CA to identify websites.",
    ),
]


def _gateway() -> tuple[dict, dict]:
    info = ui_context().node_info()
    return info, info.get("gateway") or {}


def _copy_row(label: str, value: str) -> None:
    with ui.row().classes("w-full items-center gap-2 no-wrap"):
        ui.label(label).classes("tt-muted text-sm min-w-[9rem]")
        ui.label(value).classes("font-mono text-sm break-all grow").props(f'data-reach="{label}"')
        ui.button(icon="content_copy", on_click=lambda: copy_text(value, label)).props(
            f'flat round dense aria-label="Copy {label.lower()}"'
        )


def reach_card() -> None:
    """Which address other PCs use (a warning when only this PC can reach the node)."""
    info, gateway = _gateway()
    host = info.get("host") or "?"
    with ui.column().classes("tt-card w-full p-4 gap-2").props('data-panel="reach"'):
        if info.get("loopback_only"):
            with ui.row().classes("items-center gap-2 no-wrap"):
                ui.icon("warning", color="negative").classes("text-2xl")
                ui.label("Other PCs cannot reach this PC").classes("font-semibold")
            ui.label(info["reach"]).classes("text-negative text-sm").props('data-reach="warning"')
            return
        ui.label("Other PCs reach this PC at").classes("font-semibold")
        if gateway.get("lan_url"):
            _copy_row("Web UI and API", gateway["lan_url"] + "/")
        _copy_row("Admin address (join)", f"{host}:{info.get('control_port')}")
        tls = gateway.get("tls")
        if tls:
            ui.link(
                "Their browsers trust this PC once: the certificate and its fingerprint", "/trust"
            ).classes("text-sm")


def register() -> None:
    @ui.page("/trust")
    def trust() -> None:
        apply_theme()
        ui.page_title(f"Trust this PC · {BRAND}")
        info, gateway = _gateway()
        tls = gateway.get("tls")
        with ui.column().classes("w-full max-w-3xl mx-auto p-4 gap-4"):
            ui.label("Trust this PC's HTTPS certificate").classes("text-2xl font-semibold")
            if not tls:
                ui.label(
                    "This PC serves TikTrue on its loopback address only (plain HTTP, this PC "
                    "alone): there is no certificate to trust. " + (info.get("reach") or "")
                ).classes("tt-muted")
                return
            if gateway.get("lan_url"):
                with ui.column().classes("tt-card w-full p-4 gap-2"):
                    _copy_row("Web UI and API", gateway["lan_url"] + "/")
            with ui.column().classes("tt-card w-full p-4 gap-3"):
                if tls["kind"] == "network":
                    ui.label(
                        f"TikTrue encrypts the LAN's traffic with HTTPS. The certificate of this "
                        f"PC is issued by the certificate authority (CA) of network "
                        f"{tls['network_id']}: trust that CA once in a browser (or PC), and "
                        "every PC of the network opens without a warning."
                    )
                    what = "CA certificate"
                else:
                    ui.label(
                        "This PC is in no network yet, so no network CA vouches for it: it "
                        "serves a certificate of its own (self-signed), and browsers warn "
                        "about it. Check the fingerprint below before you go on. Once this PC "
                        "creates or joins a network, the network's CA issues its certificate."
                    )
                    what = "this PC's certificate"
                _copy_row("SHA-256 fingerprint", tls["ca_fingerprint"])
                ui.label(
                    "Before trusting it, compare this fingerprint with the one the admin PC "
                    "shows (its dashboard, or this page opened there): an impostor on the LAN "
                    "cannot forge it."
                ).classes("tt-muted text-sm")
                name = f"tiktrue-{tls['network_id'] or 'node'}-ca.crt"
                ui.button(
                    f"Download the {what}",
                    icon="download",
                    on_click=lambda: ui.download.from_url(CA_DOWNLOAD, name),
                ).props(f'unelevated no-caps aria-label="Download the {what}"')
            with ui.column().classes("tt-card w-full p-4 gap-2"):
                ui.label("Install it").classes("font-semibold")
                for where, how in HOW_TO:
                    ui.label(where).classes("font-medium text-sm")
                    ui.label(how).classes("tt-muted text-sm")
                ui.label(
                    "Programs: point them at the file, e.g. the OpenAI client with "
                    "httpx.Client(verify='tiktrue-ca.crt'), or tiktrue chat --cacert FILE."
                ).classes("tt-muted text-sm")
