"""``/admin/people``: accounts (add, limits, remove) and API keys (create: the key is shown
this once; revoke), the default priority class of each (quick, normal, deep), and whether
callers without a key may use the gateway from the LAN."""

from __future__ import annotations

from datetime import datetime

from nicegui import ui

from tiktrue import limits
from tiktrue.ui.admin.operations import AdminOperations
from tiktrue.ui.admin.widgets import WIDE, admin_frame, attempt, data_table, row_button, section

USER_COLUMNS = [
    {"name": "name", "label": "Account", "field": "name", "align": "left"},
    {"name": "role", "label": "Role", "field": "role", "align": "left"},
    {"name": "rpm", "label": "Requests/min", "field": "rpm_text", **WIDE},
    {"name": "rpd", "label": "Requests/day", "field": "rpd_text", **WIDE},
    {"name": "class", "label": "Class", "field": "class_text", "align": "left"},
    {"name": "actions", "label": "", "field": "name"},
]
KEY_COLUMNS = [
    {"name": "prefix", "label": "Key", "field": "prefix_text", "align": "left"},
    {"name": "user", "label": "Account", "field": "user_name", "align": "left"},
    {"name": "name", "label": "For", "field": "name_text", "align": "left", **WIDE},
    {"name": "state", "label": "State", "field": "state", "align": "left"},
    {"name": "expires", "label": "Expires", "field": "expires_text", "align": "left", **WIDE},
    {"name": "limits", "label": "Limits", "field": "limits_text", "align": "left", **WIDE},
    {"name": "class", "label": "Class", "field": "class_text", "align": "left"},
    {"name": "actions", "label": "", "field": "id"},
]
# the choices of a default class: unset (the account's, or normal) or one of the classes
CLASSES = {"": "default", **{name: name for name in limits.PRIORITIES}}


def _limit(value: int | None) -> str:
    return "no limit" if value is None else str(value)


def _number(field) -> int | None:
    return int(field.value) if field.value not in (None, "") else None


def _class(field) -> str | None:
    return field.value or None


def _class_select(label: str) -> ui.select:
    return ui.select(CLASSES, label=label, value="").props("outlined dense")


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
            class_target: dict[str, ui.select] = {}

            async def refresh() -> None:
                people = await attempt(ops.list_users())
                listed = await attempt(ops.list_keys())
                if people is None or listed is None:
                    return
                users.update_rows(
                    [
                        {
                            **u,
                            "rpm_text": _limit(u["rpm"]),
                            "rpd_text": _limit(u["rpd"]),
                            "class_text": u["priority"] or "normal",
                        }
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
                            "class_text": k["priority"] or "of its account",
                        }
                    )
                keys.update_rows(rows)
                if "select" in user_choice:
                    user_choice["select"].set_options([u["name"] for u in people])
                if "select" in class_target:
                    targets = {f"user:{u['name']}": f"account {u['name']}" for u in people}
                    for k in listed:
                        if k["state"] == "active":
                            targets[f"key:{k['id']}"] = f"key {k['prefix']}… ({k['user_name']})"
                    class_target["select"].set_options(targets)

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
                    user_class = _class_select("Class of its requests")

                    async def add() -> None:
                        made = await attempt(
                            ops.add_user(
                                name.value or "",
                                password.value or "",
                                role.value,
                                rpm=_number(rpm),
                                rpd=_number(rpd),
                                priority=_class(user_class),
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
                    key_class = _class_select("Class of the key's requests")

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
                                priority=_class(key_class),
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
                with ui.column().classes("tt-card p-4 gap-2 w-full"):
                    ui.label("Priority class").classes("font-semibold")
                    ui.label(
                        "Under load every PC runs quick requests first and deep ones last "
                        "(a deep request waits, never for ever). A request may name its own "
                        "class; else its key's applies, else its account's, else normal."
                    ).classes("tt-muted text-sm")
                    target = ui.select({}, label="Account or key").props("outlined dense")
                    class_target["select"] = target
                    new_class = _class_select("New class")

                    async def set_class() -> None:
                        if not target.value:
                            ui.notify("choose an account or a key", type="warning")
                            return
                        kind, _, ref = target.value.partition(":")
                        change = (
                            ops.set_user_priority(ref, _class(new_class))
                            if kind == "user"
                            else ops.set_key_priority(int(ref), _class(new_class))
                        )
                        if await attempt(change, "class set"):
                            await refresh()

                    ui.button("Set class", icon="low_priority", on_click=set_class).props(
                        'unelevated no-caps aria-label="Set class"'
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
