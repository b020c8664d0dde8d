"""``/admin/people``: accounts (add, limits, remove) and API keys (create: the key is shown
this once; revoke), and whether callers without a key may use the gateway from the LAN."""

from __future__ import annotations

from datetime import datetime

from nicegui import ui

from tiktrue.ui.admin.operations import AdminOperations
from tiktrue.ui.admin.widgets import WIDE, admin_frame, attempt, data_table, row_button, section

USER_COLUMNS = [
    {"name": "name", "label": "Account", "field": "name", "align": "left"},
    {"name": "role", "label": "Role", "field": "role", "align": "left"},
    {"name": "rpm", "label": "Requests/min", "field": "rpm_text", **WIDE},
    {"name": "rpd", "label": "Requests/day", "field": "rpd_text", **WIDE},
    {"name": "actions", "label": "", "field": "name"},
]
KEY_COLUMNS = [
    {"name": "prefix", "label": "Key", "field": "prefix_text", "align": "left"},
    {"name": "user", "label": "Account", "field": "user_name", "align": "left"},
    {"name": "name", "label": "For", "field": "name_text", "align": "left", **WIDE},
    {"name": "state", "label": "State", "field": "state", "align": "left"},
    {"name": "expires", "label": "Expires", "field": "expires_text", "align": "left", **WIDE},
    {"name": "limits", "label": "Limits", "field": "limits_text", "align": "left", **WIDE},
    {"name": "actions", "label": "", "field": "id"},
]


def _limit(value: int | None) -> str:
    return "no limit" if value is None else str(value)


def _number(field) -> int | None:
    return int(field.value) if field.value not in (None, "") else None


def register(context) -> None:
    ops: AdminOperations = context.admin

    @ui.page("/admin/people")
    def people_page(network: str | None = None) -> None:
        with admin_frame("people", network) as allowed:
            if not allowed:
                return
            section("Accounts")
            users = data_table(USER_COLUMNS, "name", "No account yet")
            row_button(
                users,
                "remove",
                label="Remove",
                icon="delete",
                aria="'Remove ' + props.row.name",
                arg="props.row.name",
                show="props.row.role !== 'admin'",
                negative=True,
            )
            section("API keys")
            keys = data_table(KEY_COLUMNS, "id", "No API keys yet")
            row_button(
                keys,
                "revoke",
                label="Revoke",
                icon="block",
                aria="'Revoke key ' + props.row.prefix",
                show="props.row.state === 'active'",
                negative=True,
            )
            created = ui.column().classes("w-full")
            user_choice: dict[str, ui.select] = {}

            async def refresh() -> None:
                people = await attempt(ops.list_users())
                listed = await attempt(ops.list_keys())
                if people is None or listed is None:
                    return
                users.update_rows(
                    [
                        {**u, "rpm_text": _limit(u["rpm"]), "rpd_text": _limit(u["rpd"])}
                        for u in people
                    ]
                )
                rows = []
                for k in listed:
                    expires = k["expires_at"]
                    rows.append(
                        {
                            **k,
                            "prefix_text": f"{k['prefix']}…",
                            "name_text": k["name"] or "-",
                            "expires_text": "never"
                            if expires is None
                            else datetime.fromtimestamp(expires).strftime("%Y-%m-%d"),
                            "limits_text": f"{_limit(k['rpm'])}/min, {_limit(k['rpd'])}/day",
                        }
                    )
                keys.update_rows(rows)
                if "select" in user_choice:
                    user_choice["select"].set_options([u["name"] for u in people])

            async def remove(event) -> None:
                if await attempt(ops.remove_user(event.args), f"removed {event.args}"):
                    await refresh()

            async def revoke(event) -> None:
                if await attempt(ops.revoke_key(int(event.args)), "key revoked"):
                    await refresh()

            users.on("remove", remove)
            keys.on("revoke", revoke)

            with ui.element("div").classes("tt-grid"):
                with ui.column().classes("tt-card p-4 gap-2 w-full"):
                    ui.label("Add an account").classes("font-semibold")
                    name = ui.input("Account name").props("outlined dense")
                    password = ui.input("Password (8 characters or more)", password=True)
                    password.props("outlined dense")
                    role = ui.select({"user": "user", "admin": "admin"}, label="Role", value="user")
                    role.props("outlined dense")
                    with ui.row().classes("w-full gap-2 no-wrap"):
                        rpm = ui.number("Requests/min", min=1, step=1).props("outlined dense")
                        rpd = ui.number("Requests/day", min=1, step=1).props("outlined dense")

                    async def add() -> None:
                        made = await attempt(
                            ops.add_user(
                                name.value or "",
                                password.value or "",
                                role.value,
                                rpm=_number(rpm),
                                rpd=_number(rpd),
                            ),
                            f"added {name.value}",
                        )
                        if made:
                            name.set_value("")
                            password.set_value("")
                            await refresh()

                    ui.button("Add account", icon="person_add", on_click=add).props(
                        'unelevated no-caps aria-label="Add account"'
                    )
                with ui.column().classes("tt-card p-4 gap-2 w-full"):
                    ui.label("Create an API key").classes("font-semibold")
                    owner = ui.select([], label="Account").props("outlined dense")
                    user_choice["select"] = owner
                    purpose = ui.input("What it is for (optional)").props("outlined dense")
                    days = ui.number("Expires after (days, optional)", min=1, step=1)
                    days.props("outlined dense")
                    with ui.row().classes("w-full gap-2 no-wrap"):
                        key_rpm = ui.number("Requests/min", min=1, step=1).props("outlined dense")
                        key_rpd = ui.number("Requests/day", min=1, step=1).props("outlined dense")

                    async def create() -> None:
                        if not owner.value:
                            ui.notify("choose the account the key is for", type="warning")
                            return
                        made = await attempt(
                            ops.create_key(
                                owner.value,
                                name=purpose.value or None,
                                days=_number(days),
                                rpm=_number(key_rpm),
                                rpd=_number(key_rpd),
                            )
                        )
                        if made:
                            created.clear()
                            with created, ui.column().classes("tt-card w-full p-4 gap-2"):
                                ui.label("The new key, shown this once: copy it now.").classes(
                                    "font-semibold text-positive"
                                )
                                shown = ui.textarea("New API key", value=made["key"])
                                shown.props("outlined readonly autogrow")
                                shown.classes("w-full font-mono")
                                ui.button(
                                    "Copy",
                                    icon="content_copy",
                                    on_click=lambda k=made["key"]: ui.clipboard.write(k),
                                ).props('flat no-caps aria-label="Copy the key"')
                            await refresh()

                    ui.button("Create key", icon="key", on_click=create).props(
                        'unelevated no-caps aria-label="Create key"'
                    )
            section("The gateway")
            anonymous = ui.switch(
                "Callers without a key may use the gateway from the LAN",
                value=ops.anonymous_access(),
                on_change=lambda e: ops.set_anonymous_access(bool(e.value)),
            ).props('aria-label="Allow callers without a key from the LAN"')
            anonymous.classes("text-sm")
            ui.label("This PC's own programs never need a key.").classes("tt-muted text-sm")
            ui.timer(0.05, refresh, once=True)
