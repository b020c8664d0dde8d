"""Where other PCs reach this node, and how a browser comes to trust its HTTPS certificate.

``reach_card()`` is the panel the first run (``/setup``) and the admin dashboard show: the
address other PCs use (the web UI over HTTPS, the control address for joining), or a warning
when the node listens on loopback only. ``/trust`` (open to anyone: a browser needs it before
it logs in) offers the certificate to trust, the network CA's (or this PC's own, self-signed,
before it is in a network), with its SHA-256 fingerprint and how to install it once per
browser or PC.

Addresses and the fingerprint are Latin values: each is laid out left-to-right on its own
(``tt-value``), in a Persian page too. The menus a person clicks through to install the
certificate are named as the systems name them (their English), inside translated sentences.
"""

from __future__ import annotations

from nicegui import ui

from tiktrue.ui.context import ui_context
from tiktrue.ui.i18n import N_, Message, _, translate
from tiktrue.ui.layout import BRAND, apply_theme, copy_text

CA_DOWNLOAD = "/tls/ca.crt"
VALUE = "tt-value"  # a Latin value (an address, a fingerprint): left-to-right, isolated

# (where, what to do, the menus to choose in order, what then): the browsers' and systems' own
# menu names stay as they show them, each path on a line of its own, left-to-right
_IN_SETTINGS = N_("In the browser's settings choose, in order:")
HOW_TO = [
    (
        N_("{system} ({browsers})", system="Windows", browsers="Edge, Chrome"),
        N_("Open the downloaded file and choose, in order:"),
        "Install Certificate… › Local Machine › Place all certificates in the following store "
        "› Trusted Root Certification Authorities",
        N_("Then restart the browser."),
    ),
    (
        N_("{system} ({browsers})", system="macOS", browsers="Safari, Chrome"),
        N_(
            "Open the file in {app} (the {keychain} keychain), open the certificate and set:",
            app="Keychain Access",
            keychain="System",
        ),
        "Trust › When using this certificate › Always Trust",
        None,
    ),
    (
        N_("{system} ({browsers})", system="Linux", browsers="Chrome, Chromium"),
        _IN_SETTINGS,
        "Settings › Privacy and security › Security › Manage certificates › Authorities › Import",
        N_("Then tick {option}.", option="Trust this certificate for identifying websites"),
    ),
    (
        N_("{browser} (every system)", browser="Firefox"),
        _IN_SETTINGS,
        "Settings › Privacy & Security › Certificates › View Certificates › Authorities › Import",
        N_("Then tick {option}.", option="Trust this CA to identify websites"),
    ),
]
CLIENTS = ("httpx.Client(verify='tiktrue-ca.crt')", "tiktrue chat --cacert tiktrue-ca.crt")


def _gateway() -> tuple[dict, dict]:
    info = ui_context().node_info()
    return info, info.get("gateway") or {}


def loopback_note(info: dict) -> str:
    """Why other PCs cannot reach a node on loopback, and what to do (the node's own
    ``reach_note``, in the person's language)."""
    return _(
        "{host} is this PC's loopback address: other PCs cannot reach this node. Start it "
        "without {local} (it then takes the PC's LAN address), or with {option} and its LAN "
        "address.",
        host=info.get("host") or "127.0.0.1",
        local="--local",
        option="--host",
    )


def _value(text: str, *, code: bool = True, **props: str) -> ui.label:
    """A Latin value on its own, left-to-right: an address, a fingerprint or a command
    (``code``: monospaced, broken anywhere), or a path of menus (words)."""
    look = "font-mono break-all" if code else "font-medium break-words"
    extra = "".join(f' {name}="{value}"' for name, value in props.items())
    return ui.label(text).classes(f"text-sm min-w-0 {look} {VALUE}").props(f'dir="ltr"{extra}')


def _copy_row(label: Message, value: str) -> None:
    """A labelled value with a copy button (the label above it at phone width); ``data-reach``
    names the row by its English label, whatever the page's language (tests and scripts find
    it by that)."""
    text = translate(label)
    with ui.row().classes("w-full items-center gap-x-2 gap-y-0 flex-wrap sm:flex-nowrap"):
        ui.label(text).classes("tt-muted text-sm w-full sm:w-48 shrink-0")
        _value(value, **{"data-reach": str(label)})
        copy = _("Copy {what}", what=text)
        ui.button(icon="content_copy", on_click=lambda: copy_text(value, text)).props(
            f'flat round dense aria-label="{copy}" title="{copy}"'
        )


WEB_UI = N_("Web UI and API")
JOIN_ADDRESS = N_("Admin address (join)")
FINGERPRINT = N_("SHA-256 fingerprint")


def reach_card() -> None:
    """Which address other PCs use (a warning when only this PC can reach the node)."""
    info, gateway = _gateway()
    host = info.get("host") or "?"
    with ui.column().classes("tt-card w-full p-4 gap-2").props('data-panel="reach"'):
        if info.get("loopback_only"):
            with ui.row().classes("items-center gap-2 no-wrap"):
                ui.icon("warning", color="negative").classes("text-2xl")
                ui.label(_("Other PCs cannot reach this PC")).classes("font-semibold")
            ui.label(loopback_note(info)).classes("text-negative text-sm").props(
                'data-reach="warning"'
            )
            return
        ui.label(_("Other PCs reach this PC at")).classes("font-semibold")
        if gateway.get("lan_url"):
            _copy_row(WEB_UI, gateway["lan_url"] + "/")
        _copy_row(JOIN_ADDRESS, f"{host}:{info.get('control_port')}")
        if gateway.get("tls"):
            ui.link(
                _("Their browsers trust this PC once: the certificate and its fingerprint"),
                "/trust",
            ).classes("text-sm")


def register() -> None:
    @ui.page("/trust")
    def trust() -> None:
        apply_theme()
        title = _("Trust this PC")
        ui.page_title(f"{title} · {BRAND}")
        info, gateway = _gateway()
        tls = gateway.get("tls")
        with ui.column().classes("w-full max-w-3xl mx-auto p-4 gap-4"):
            ui.label(_("Trust this PC's HTTPS certificate")).classes("text-2xl font-semibold")
            if not tls:
                ui.label(
                    _(
                        "This PC serves {product} on its loopback address only (plain HTTP, "
                        "for this PC alone): there is no certificate to trust.",
                        product=BRAND,
                    )
                ).classes("tt-muted")
                if info.get("loopback_only"):
                    ui.label(loopback_note(info)).classes("tt-muted")
                return
            if gateway.get("lan_url"):
                with ui.column().classes("tt-card w-full p-4 gap-2"):
                    _copy_row(WEB_UI, gateway["lan_url"] + "/")
            with ui.column().classes("tt-card w-full p-4 gap-3"):
                if tls["kind"] == "network":
                    ui.label(
                        _(
                            "{product} encrypts the LAN's traffic with HTTPS. This PC's "
                            "certificate is issued by the certificate authority (CA) of "
                            "network {network}: trust that CA once in a browser (or on a PC), "
                            "and every PC of the network opens without a warning.",
                            product=BRAND,
                            network=tls["network_id"],
                        )
                    )
                    download = _("Download the CA certificate")
                else:
                    ui.label(
                        _(
                            "This PC is in no network yet, so no network CA vouches for it: "
                            "it serves a certificate of its own (self-signed), and browsers "
                            "warn about it. Check the fingerprint below before you go on. "
                            "Once this PC creates or joins a network, the network's CA "
                            "issues its certificate."
                        )
                    )
                    download = _("Download this PC's certificate")
                _copy_row(FINGERPRINT, tls["ca_fingerprint"])
                ui.label(
                    _(
                        "Before trusting it, compare this fingerprint with the one the admin "
                        "PC shows (on its dashboard, or this page opened there): an impostor "
                        "on the LAN cannot forge it."
                    )
                ).classes("tt-muted text-sm")
                name = f"tiktrue-{tls['network_id'] or 'node'}-ca.crt"
                ui.button(
                    download,
                    icon="download",
                    on_click=lambda: ui.download.from_url(CA_DOWNLOAD, name),
                ).props(f'unelevated no-caps aria-label="{download}"')
            with ui.column().classes("tt-card w-full p-4 gap-2"):
                ui.label(_("Install it")).classes("font-semibold")
                for where, before, path, after in HOW_TO:
                    ui.label(translate(where)).classes("font-medium text-sm mt-2")
                    ui.label(translate(before)).classes("tt-muted text-sm")
                    _value(path, code=False)
                    if after is not None:
                        ui.label(translate(after)).classes("tt-muted text-sm")
                ui.label(
                    _(
                        "Programs: point them at the file, e.g. the {client} client in Python, "
                        "or {product}'s own chat:",
                        client="OpenAI",
                        product=BRAND,
                    )
                ).classes("tt-muted text-sm mt-2")
                for line in CLIENTS:
                    _value(line)
