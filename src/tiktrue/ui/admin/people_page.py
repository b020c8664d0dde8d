"""``/admin/people``: accounts (add, limits, remove) and API keys (create: the key is shown
this once; revoke), the default priority class of each (quick, normal, deep), and whether
callers without a key may use the gateway from the LAN."""

from __future__ import annotations

from nicegui import ui

from tiktrue import limits
from tiktrue.security.users import MIN_PASSWORD_CHARS
from tiktrue.ui.admin.operations import AdminOperations
from tiktrue.ui.admin.widgets import (
    WIDE,
    admin_frame,
    attempt,
    data_table,
    js_name,
    row_button,
    section,
    state_text,
)
from tiktrue.ui.i18n import N_, _, fmt_date, number, translate

USER_COLUMNS = [
    {"name": "name", "label": N_("Account"), "field": "name", "align": "left"},
    {"name": "role", "label": N_("Role"), "field": "role_text", "align": "left"},
    {"name": "rpm", "label": N_("Requests/min"), "field": "rpm_text", **WIDE},
    {"name": "rpd", "label": N_("Requests/day"), "field": "rpd_text", **WIDE},
    {"name": "class", "label": N_("Class"), "field": "class_text", "align": "left"},
    {"name": "actions", "label": "", "field": "name"},
]
KEY_COLUMNS = [
    {"name": "prefix", "label": N_("Key"), "field": "prefix_text", "align": "left"},
    {"name": "user", "label": N_("Account"), "field": "user_name", "align": "left"},
    {"name": "name", "label": N_("For"), "field": "name_text", "align": "left", **WIDE},
    {"name": "state", "label": N_("State"), "field": "state_text", "align": "left"},
    {"name": "expires", "label": N_("Expires"), "field": "expires_text", "align": "left", **WIDE},
    {"name": "limits", "label": N_("Limits"), "field": "limits_text", "align": "left", **WIDE},
    {"name": "class", "label": N_("Class"), "field": "class_text", "align": "left"},
    {"name": "actions", "label": "", "field": "id"},
]
# the choices of a default class: unset (the account's, or normal) or one of the classes
CLASS_NAMES = {"quick": N_("quick"), "normal": N_("normal"), "deep": N_("deep")}


def class_name(name: str) -> str:
    """A priority class in the person's language."""
    return translate(CLASS_NAMES.get(name, name))


def _limit(value: int | None) -> str:
    return _("no limit") if value is None else number(value)


def _number(field) -> int | None:
    return int(field.value) if field.value not in (None, "") else None


def _class(field) -> str | None:
    return field.value or None


def _class_select(label: str) -> ui.select:
    """The choices of a default class: unset (the account's, or normal) or one of them."""
    choices = {"": _("default"), **{name: class_name(name) for name in limits.PRIORITIES}}
    return ui.select(choices, label=label, value="").props("outlined dense")


def register(context) -> None:
    ops: AdminOperations = context.admin

    @ui.page("/admin/people")
    def people_page(network: str | None = None) -> None:
        with admin_frame("people", network) as allowed:
            if not allowed:
                return
            section(_("Accounts"))
            users = data_table(USER_COLUMNS, "name", _("No account yet"))
            row_button(
                users,
                "remove",
                label=_("Remove"),
                icon="delete",
                aria=js_name(_("Remove"), "name"),
                arg="props.row.name",
                show="props.row.role !== 'admin'",
                negative=True,
            )
            section(_("API keys"))
            keys = data_table(KEY_COLUMNS, "id", _("No API keys yet"))
            row_button(
                keys,
                "revoke",
                label=_("Revoke"),
                icon="block",
                aria=js_name(_("Revoke key"), "prefix"),
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
                            "role_text": state_text(u["role"]),
                            "rpm_text": _limit(u["rpm"]),
                            "rpd_text": _limit(u["rpd"]),
                            "class_text": class_name(u["priority"] or "normal"),
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
                            "state_text": state_text(k["state"]),
                            "expires_text": _("never") if expires is None else fmt_date(expires),
                            "limits_text": _(
                                "{rpm}/min, {rpd}/day", rpm=_limit(k["rpm"]), rpd=_limit(k["rpd"])
                            ),
                            "class_text": class_name(k["priority"])
                            if k["priority"]
                            else _("of its account"),
                        }
                    )
                keys.update_rows(rows)
                if "select" in user_choice:
                    user_choice["select"].set_options([u["name"] for u in people])
                if "select" in class_target:
                    targets = {
                        f"user:{u['name']}": _("account {name}", name=u["name"]) for u in people
                    }
                    for k in listed:
                        if k["state"] == "active":
                            targets[f"key:{k['id']}"] = _(
                                "key {prefix}… ({account})",
                                prefix=k["prefix"],
                                account=k["user_name"],
                            )
                    class_target["select"].set_options(targets)

            async def remove(event) -> None:
                if await attempt(ops.remove_user(event.args), _("Removed {name}", name=event.args)):
                    await refresh()

            async def revoke(event) -> None:
                if await attempt(ops.revoke_key(int(event.args)), _("Key revoked")):
                    await refresh()

            users.on("remove", remove)
            keys.on("revoke", revoke)

            with ui.element("div").classes("tt-grid"):
                with ui.column().classes("tt-card p-4 gap-2 w-full"):
                    ui.label(_("Add an account")).classes("font-semibold")
                    name = ui.input(_("Account name")).props("outlined dense")
                    password = ui.input(
                        _("Password ({n} characters or more)", n=MIN_PASSWORD_CHARS), password=True
                    )
                    password.props("outlined dense")
                    role = ui.select(
                        {"user": state_text("user"), "admin": state_text("admin")},
                        label=_("Role"),
                        value="user",
                    )
                    role.props("outlined dense")
                    with ui.row().classes("w-full gap-2 no-wrap"):
                        rpm = ui.number(_("Requests/min"), min=1, step=1).props("outlined dense")
                        rpd = ui.number(_("Requests/day"), min=1, step=1).props("outlined dense")
                    user_class = _class_select(_("Class of its requests"))

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
                            _("Added {name}", name=name.value or ""),
                        )
                        if made:
                            name.set_value("")
                            password.set_value("")
                            await refresh()

                    label = _("Add account")
                    ui.button(label, icon="person_add", on_click=add).props(
                        f'unelevated no-caps aria-label="{label}"'
                    )
                with ui.column().classes("tt-card p-4 gap-2 w-full"):
                    ui.label(_("Create an API key")).classes("font-semibold")
                    owner = ui.select([], label=_("Account")).props("outlined dense")
                    user_choice["select"] = owner
                    purpose = ui.input(_("What it is for (optional)")).props("outlined dense")
                    days = ui.number(_("Expires after (days, optional)"), min=1, step=1)
                    days.props("outlined dense")
                    with ui.row().classes("w-full gap-2 no-wrap"):
                        key_rpm = ui.number(_("Requests/min"), min=1, step=1)
                        key_rpm.props("outlined dense")
                        key_rpd = ui.number(_("Requests/day"), min=1, step=1)
                        key_rpd.props("outlined dense")
                    key_class = _class_select(_("Class of the key's requests"))

                    async def create() -> None:
                        if not owner.value:
                            ui.notify(_("Choose the account the key is for."), type="warning")
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
                                ui.label(_("The new key, shown this once: copy it now.")).classes(
                                    "font-semibold text-positive"
                                )
                                shown = ui.textarea(_("New API key"), value=made["key"])
                                shown.props("outlined readonly autogrow")
                                shown.classes("w-full font-mono tt-ltr")
                                named = _("Copy the key")
                                ui.button(
                                    _("Copy"),
                                    icon="content_copy",
                                    on_click=lambda k=made["key"]: ui.clipboard.write(k),
                                ).props(f'flat no-caps aria-label="{named}"')
                            await refresh()

                    label = _("Create key")
                    ui.button(label, icon="key", on_click=create).props(
                        f'unelevated no-caps aria-label="{label}"'
                    )
                with ui.column().classes("tt-card p-4 gap-2 w-full"):
                    ui.label(_("Priority class")).classes("font-semibold")
                    ui.label(
                        _(
                            "Under load every PC runs quick requests first and deep ones last "
                            "(a deep request waits, never for ever). A request may name its "
                            "own class; else its key's applies, else its account's, else normal."
                        )
                    ).classes("tt-muted text-sm")
                    target = ui.select({}, label=_("Account or key")).props("outlined dense")
                    class_target["select"] = target
                    new_class = _class_select(_("New class"))

                    async def set_class() -> None:
                        if not target.value:
                            ui.notify(_("choose an account or a key"), type="warning")
                            return
                        kind, _sep, ref = target.value.partition(":")
                        change = (
                            ops.set_user_priority(ref, _class(new_class))
                            if kind == "user"
                            else ops.set_key_priority(int(ref), _class(new_class))
                        )
                        if await attempt(change, _("class set")):
                            await refresh()

                    label = _("Set class")
                    ui.button(label, icon="low_priority", on_click=set_class).props(
                        f'unelevated no-caps aria-label="{label}"'
                    )
            section(_("The gateway"))
            anonymous = ui.switch(
                _("Callers without a key may use the gateway from the LAN"),
                value=ops.anonymous_access(),
                on_change=lambda e: ops.set_anonymous_access(bool(e.value)),
            )
            named = _("Allow callers without a key from the LAN")
            anonymous.props(f'aria-label="{named}"').classes("text-sm")
            ui.label(_("This PC's own programs never need a key.")).classes("tt-muted text-sm")
            ui.timer(0.05, refresh, once=True)
