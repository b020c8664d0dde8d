"""``/chat``: every person's chat.

Left, the person's conversations (new, search, rename, delete; a click resumes one). Top, the
network (and so the model) that answers, and the generation settings with the system prompt.
The answer streams as markdown with code blocks; Stop ends it; under each answer, which
network and model gave it, its speed (tokens/s, time to first token), thumbs up/down, copy,
and on the last one Regenerate; a question can be edited and sent again.

Rendering stays cheap on long answers: tokens only append to a string, and the markdown is
drawn again at most every ``RENDER_S`` while it streams, then once at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from nicegui import app, background_tasks, ui

from tiktrue import limits
from tiktrue.gateway.session_store import Answer
from tiktrue.security.users import Principal
from tiktrue.ui.chat_logic import (
    Chat,
    ChatFailure,
    Settings,
    Turn,
    saved_form,
    settings_from,
)
from tiktrue.ui.context import ui_context
from tiktrue.ui.i18n import _, fmt_ago, fmt_date, isolate, ngettext, number, translate
from tiktrue.ui.layout import copy_text, page_frame, require_user

SETTINGS_KEY = "tiktrue_chat_settings"
RENDER_S = 0.25  # while an answer streams, its markdown is redrawn at most this often
CHAT_STYLE = """
.tt-chat { max-width: 52rem; margin: 0 auto; width: 100%; }
.tt-user { background: #eef2ff; border-radius: 16px; padding: 0.6rem 0.9rem;
           max-width: 85%; white-space: pre-wrap; }
.tt-meta { font-size: 0.75rem; color: #6b7280; }
.tt-conv { border-radius: 8px; }
.tt-conv.active { background: #eef2ff; }
.tt-footer { background: #f7f7f8 !important; }
"""


@dataclass
class ChatState:
    """One browser tab's chat: the open conversation and what streams in it."""

    network_id: str | None = None
    session_id: str | None = None
    messages: list[dict] = field(default_factory=list)
    answers: dict[int, Answer] = field(default_factory=dict)
    settings: Settings = field(default_factory=Settings)
    turn: Turn | None = None
    streaming: bool = False
    stop_requested: bool = False  # Stop pressed during this turn
    error: str = ""
    window_start: int = 0  # the model no longer sees the messages before this one


def register() -> None:
    @ui.page("/chat")
    async def chat_page(net: str = "", id: str = "", denied: str = "") -> None:  # noqa: A002
        user = require_user()
        if user is None:
            return
        view = ChatView(Chat(ui_context(), user), user)
        await view.build(net, id)
        if denied:
            ui.notify(_("The admin pages are for administrators only."), type="warning")


class ChatView:
    def __init__(self, chat: Chat, user: Principal) -> None:
        self.chat = chat
        self.user = user
        self.state = ChatState(settings=_saved_settings())

    # --- building ---------------------------------------------------------------------------

    async def build(self, network_id: str, session_id: str) -> None:
        networks = self.chat.networks()
        if network_id and session_id:
            stored = await self.chat.load(network_id, session_id)
            if stored is not None:
                self.state.network_id, self.state.session_id = network_id, session_id
                self.state.messages = list(stored.messages)
                self.state.window_start = stored.window_start
                self.state.answers = await self.chat.answers(network_id, session_id)
                system = [m for m in stored.messages if m["role"] == "system"]
                self.state.settings.system_prompt = system[0]["content"] if system else ""
            else:
                ui.notify(_("That conversation is not yours or no longer exists."), type="warning")
        if self.state.network_id is None and networks:
            self.state.network_id = next(iter(networks))
        with page_frame("", drawer=True) as frame:
            ui.add_css(CHAT_STYLE)
            frame.main.classes(remove="max-w-5xl p-4").classes("max-w-none px-2 pb-40")
            with frame.drawer:
                self._drawer()
            self._top_bar(networks)
            self.log = ui.column().classes("tt-chat gap-5 px-2")
            self._draw_messages()
        self._footer(bool(networks))
        await self._list_conversations()

    def _drawer(self) -> None:
        with ui.column().classes("w-full p-3 gap-2"):
            label = _("New chat")
            ui.button(label, icon="edit_square", on_click=self.new_chat).props(
                f'unelevated no-caps aria-label="{label}"'
            ).classes("w-full")
            label = _("Search conversations")
            self.search = (
                ui.input(placeholder=label)
                .props(f'dense outlined clearable aria-label="{label}"')
                .classes("w-full")
            )
            self.search.on("update:model-value", self._list_conversations, throttle=0.3)
            self.conversations = ui.column().classes("w-full gap-0")

    def _top_bar(self, networks: dict[str, str]) -> None:
        if self.state.network_id and self.state.network_id not in networks:
            away = _("{network} (away)", network=self.state.network_id)
            networks = {**networks, self.state.network_id: away}
        with ui.row().classes("tt-chat items-center gap-2 px-2 no-wrap"):
            locked = self.state.session_id is not None
            named = _("Network and model")
            self.network = ui.select(
                networks,
                value=self.state.network_id,
                label=_("Network · model"),
                on_change=lambda e: setattr(self.state, "network_id", e.value),
            ).props(f'dense outlined options-dense aria-label="{named}"')
            self.network.classes("flex-1 max-w-md")
            if locked:
                self.network.disable()
                self.network.tooltip(_("A conversation stays on the network it began on"))
            ui.space()
            label = _("Settings")
            ui.button(icon="tune", on_click=self._settings_dialog).props(
                f'flat round aria-label="{label}"'
            ).tooltip(_("System prompt and generation settings"))

    def _footer(self, has_network: bool) -> None:
        with ui.footer().classes("tt-footer p-0"), ui.column().classes("tt-chat px-3 pt-2 pb-3"):
            with ui.row().classes("w-full items-end gap-2 no-wrap tt-card px-3 py-1"):
                label = _("Message")
                self.input = (
                    ui.textarea(placeholder=_("Message TikTrue ..."))
                    .props(f'autogrow borderless dense aria-label="{label}"')
                    .classes("flex-1 text-base tt-plain")
                )
                self.input.on(
                    "keydown",
                    self.send,
                    js_handler="(e) => { if (e.key === 'Enter' && !e.shiftKey "
                    "&& !e.isComposing) { e.preventDefault(); emit(); } }",
                )
                label = _("Send")
                self.send_button = ui.button(icon="arrow_upward", on_click=self.send).props(
                    f'round unelevated aria-label="{label}"'
                )
                label = _("Stop")
                self.stop_button = ui.button(icon="stop", on_click=self.stop).props(
                    f'round unelevated color=negative aria-label="{label}"'
                )
                self.stop_button.set_visibility(False)
            ui.label(
                _("Answers come from the model your network runs; check what matters.")
                if has_network
                else _("No network answers on this PC yet.")
            ).classes("tt-meta text-center w-full")
        if not has_network:
            self.input.disable()
            self.send_button.disable()

    # --- the conversation list ---------------------------------------------------------------

    async def _list_conversations(self, *_event) -> None:
        items = await self.chat.conversations(self.search.value or "")
        self.conversations.clear()
        with self.conversations:
            if not items:
                ui.label(
                    _("No conversations yet.") if not self.search.value else _("Nothing found.")
                )
                return
            for item in items:
                active = (item.network_id, item.session_id) == (
                    self.state.network_id,
                    self.state.session_id,
                )
                row = ui.row().classes(
                    "tt-conv w-full items-center no-wrap px-2 py-1 cursor-pointer hover:bg-grey-2"
                    + (" active" if active else "")
                )
                title = item.title or _("New chat")
                with row:
                    with (
                        ui.column()
                        .classes("gap-0 flex-1 min-w-0")
                        .on("click", lambda _e, i=item: self.open(i.network_id, i.session_id))
                    ):
                        ui.label(title).classes("truncate w-full text-sm").props("dir=auto")
                        ui.label(_ago(item.updated_at)).classes("tt-meta")
                    more = _("More for {title}", title=title)
                    with (
                        ui.button(icon="more_horiz").props(
                            f'flat round dense size=sm aria-label="{more}"'
                        ),
                        ui.menu(),
                    ):
                        ui.menu_item(_("Rename"), on_click=lambda i=item: self._rename_dialog(i))
                        ui.menu_item(_("Delete"), on_click=lambda i=item: self._delete_dialog(i))

    def open(self, network_id: str, session_id: str) -> None:
        ui.navigate.to(f"/chat?net={network_id}&id={session_id}")

    def new_chat(self) -> None:
        ui.navigate.to("/chat")

    def _rename_dialog(self, item) -> None:
        with ui.dialog() as dialog, ui.card().classes("w-96"):
            ui.label(_("Rename conversation")).classes("text-lg font-medium")
            name = ui.input(_("Title"), value=item.title or "").props("outlined autofocus")
            name.classes("w-full")

            async def save() -> None:
                await self.chat.rename(item.network_id, item.session_id, name.value or "")
                dialog.close()
                await self._list_conversations()

            _cancel_save(dialog, save)
        dialog.open()

    def _delete_dialog(self, item) -> None:
        with ui.dialog() as dialog, ui.card().classes("w-96"):
            ui.label(_("Delete this conversation?")).classes("text-lg font-medium")
            ui.label(item.title or _("New chat")).classes("tt-muted").props("dir=auto")

            async def delete() -> None:
                await self.chat.delete(item.network_id, item.session_id)
                dialog.close()
                if (item.network_id, item.session_id) == (
                    self.state.network_id,
                    self.state.session_id,
                ):
                    self.new_chat()
                    return
                await self._list_conversations()

            with ui.row().classes("w-full justify-end"):
                ui.button(_("Cancel"), on_click=dialog.close).props("flat no-caps")
                label = _("Delete")
                ui.button(label, on_click=delete).props(
                    f'unelevated no-caps color=negative aria-label="{label}"'
                )
        dialog.open()

    # --- settings ---------------------------------------------------------------------------

    def _settings_dialog(self) -> None:
        s = self.state.settings
        model = self.chat.defaults(self.state.network_id)

        def shown(name: str):  # the person's value, else the model's
            value = getattr(s, name)
            return getattr(model, name) if value is None else value

        with ui.dialog() as dialog, ui.card().classes("w-[28rem] max-w-full gap-3"):
            ui.label(_("Settings")).classes("text-lg font-medium")
            system = ui.textarea(_("System prompt"), value=s.system_prompt)
            system.props("outlined").classes("w-full tt-plain")
            sliders = {
                "temperature": _slider(
                    _("Temperature"), shown("temperature"), 0.0, limits.MAX_TEMPERATURE, 0.05
                ),
                "top_p": _slider(_("Top p"), shown("top_p"), 0.05, 1.0, 0.05),
                "top_k": _slider(_("Top k"), shown("top_k"), 0, 100, 1),
                "min_p": _slider(_("Min p"), shown("min_p"), 0.0, 1.0, 0.01),
                "repetition_penalty": _slider(
                    _("Repetition penalty"), shown("repetition_penalty"), 1.0, 2.0, 0.05
                ),
            }
            tokens = ui.number(_("Max tokens per answer"), value=s.max_tokens, min=1, max=8192)
            tokens.props("outlined").classes("w-full")

            def the_models() -> None:
                for name, slider in sliders.items():
                    slider.set_value(getattr(model, name))

            def save() -> None:
                s.system_prompt = (system.value or "").strip()
                for name, slider in sliders.items():
                    kind = int if name == "top_k" else float
                    s.chosen(name, kind(slider.value), model)
                s.max_tokens = int(tokens.value or limits.DEFAULT_MAX_TOKENS)
                app.storage.user[SETTINGS_KEY] = saved_form(s)  # for this person's next chats
                dialog.close()

            with ui.row().classes("w-full items-center"):
                label = _("Model's defaults")
                ui.button(label, on_click=the_models).props(
                    f'flat no-caps aria-label="{label}"'
                ).tooltip(_("The settings the model recommends"))
                ui.space()
                ui.button(_("Cancel"), on_click=dialog.close).props("flat no-caps")
                label = _("Save")
                ui.button(label, on_click=save).props(f'unelevated no-caps aria-label="{label}"')
        dialog.open()

    # --- messages ---------------------------------------------------------------------------

    def _draw_messages(self) -> None:
        self.log.clear()
        with self.log:
            shown = [(i, m) for i, m in enumerate(self.state.messages) if m["role"] != "system"]
            if not shown:
                self._empty()
            last_answer = max((i for i, m in shown if m["role"] == "assistant"), default=None)
            for index, message in shown:
                if index == self.state.window_start and index > shown[0][0]:
                    self._window_starts()
                if message["role"] == "user":
                    self._user_message(index, message["content"])
                else:
                    body, _markdown = self._assistant_message(message["content"])
                    self._answer_meta(body, index, last=index == last_answer)

    def _window_starts(self) -> None:
        """Where the model's window starts: the conversation outgrew the network's context,
        and the turns above left it (the system prompt stays)."""
        with (
            ui.row()
            .classes("w-full items-center gap-2 tt-meta")
            .props('role="separator" aria-label="The model\'s window starts here"')
        ):
            ui.separator().classes("flex-1")
            ui.label("The model no longer sees the messages above; it remembers from here.")
            ui.separator().classes("flex-1")

    def _empty(self) -> None:
        with ui.column().classes("w-full items-center gap-2 py-16"):
            ui.icon("forum", color="primary").classes("text-5xl opacity-60")
            ui.label(_("How can I help?")).classes("text-2xl font-semibold")
            networks = self.chat.networks()
            if networks:
                who = networks.get(self.state.network_id, "")
                ui.label(_("{who} answers, on the PCs of your network.", who=who)).classes(
                    "tt-muted"
                )
            elif self.user.role == "admin":
                ui.label(_("This PC is in no network that answers yet.")).classes("tt-muted")
                label = _("Set up this PC")
                ui.button(label, on_click=lambda: ui.navigate.to("/setup")).props(
                    f'unelevated no-caps aria-label="{label}"'
                )
            else:
                ui.label(_("No network answers on this PC yet: ask your administrator.")).classes(
                    "tt-muted"
                )

    def _user_message(self, index: int, text: str) -> None:
        with ui.column().classes("w-full items-end gap-1") as box:
            ui.label(text).classes("tt-user").props("dir=auto")
            label = _("Edit and resend")
            ui.button(icon="edit", on_click=lambda: self._edit(box, index, text)).props(
                f'flat round dense size=sm aria-label="{label}"'
            ).classes("text-grey-6").tooltip(_("Edit and send again"))

    def _assistant_message(self, text: str) -> tuple[ui.column, ui.markdown]:
        with ui.row().classes("w-full no-wrap gap-3 items-start"):
            ui.avatar("hub", color="primary", text_color="white", size="sm").classes("mt-1")
            with ui.column().classes("flex-1 min-w-0 gap-1") as body:
                markdown = ui.markdown(text).classes("tt-answer w-full").props("dir=auto")
        return body, markdown

    def _answer_meta(self, body: ui.column, index: int, *, last: bool) -> None:
        answer = self.state.answers.get(index)
        gateway = self.chat.context.gateways.get(self.state.network_id or "")
        network = gateway.config.name if gateway is not None else self.state.network_id
        with body, ui.row().classes("items-center gap-1 tt-meta"):
            if answer is not None:
                ui.label(_figures(network, answer)).classes("me-2")
            self._thumb(index, 1, answer)
            self._thumb(index, -1, answer)
            text = self.state.messages[index]["content"]
            label = _("Copy")
            ui.button(icon="content_copy", on_click=lambda: copy_text(text)).props(
                f'flat round dense size=sm aria-label="{label}"'
            ).classes("text-grey-7").tooltip(label)
            if last:
                label = _("Regenerate")
                ui.button(icon="refresh", on_click=self.regenerate).props(
                    f'flat round dense size=sm aria-label="{label}"'
                ).classes("text-grey-7").tooltip(label)

    def _thumb(self, index: int, rating: int, answer: Answer | None) -> None:
        chosen = answer is not None and answer.rating == rating
        icon = "thumb_up" if rating > 0 else "thumb_down"
        name = _("Good answer") if rating > 0 else _("Bad answer")

        async def rate() -> None:
            if self.state.session_id is None or answer is None:
                return
            new = None if chosen else rating
            await self.chat.rate(self.state.network_id, self.state.session_id, index, new)
            answer.rating = new
            self._draw_messages()

        button = ui.button(icon=icon, on_click=rate).props(
            f'flat round dense size=sm aria-label="{name}" aria-pressed="{str(chosen).lower()}"'
        )
        button.classes("text-primary" if chosen else "text-grey-7")
        button.tooltip(name)

    def _edit(self, box: ui.column, index: int, text: str) -> None:
        if self.state.streaming:
            return
        box.clear()
        with box:
            label = _("Edit message")
            editor = ui.textarea(value=text).props(f'outlined autogrow aria-label="{label}"')
            editor.classes("w-full tt-plain")

            async def resend() -> None:
                messages = self.state.messages[:index]
                messages.append({"role": "user", "content": editor.value or ""})
                await self._run_turn(messages)

            with ui.row().classes("gap-2"):
                ui.button(_("Cancel"), on_click=self._draw_messages).props("flat no-caps")
                label = _("Send edited message")
                ui.button(_("Send"), on_click=resend).props(
                    f'unelevated no-caps aria-label="{label}"'
                )

    # --- turns ------------------------------------------------------------------------------

    async def send(self) -> None:
        text = (self.input.value or "").strip()
        if not text or self.state.streaming:
            return
        self.input.set_value("")
        messages = [m for m in self.state.messages if m["role"] != "system"]
        messages.append({"role": "user", "content": text})
        await self._run_turn(messages)

    async def regenerate(self) -> None:
        if self.state.streaming:
            return
        messages = [m for m in self.state.messages if m["role"] != "system"]
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if messages:
            await self._run_turn(messages)

    async def stop(self) -> None:
        """Stop the answer: at once, or, pressed before its first token (the conversation not
        yet on the network), at that token."""
        if self.state.streaming and self.state.session_id:
            self.state.stop_requested = True
            await self.chat.stop(self.state.network_id, self.state.session_id)

    async def _run_turn(self, messages: list[dict]) -> None:
        """Answer ``messages`` (without the system prompt, which is put first here)."""
        state = self.state
        if state.network_id is None:
            ui.notify(_("No network answers on this PC yet."), type="warning")
            return
        system = state.settings.system_prompt
        full = ([{"role": "system", "content": system}] if system else []) + messages
        new = state.session_id is None
        if new:
            state.session_id = await self.chat.new_conversation_id(state.network_id)
        state.messages = full
        state.streaming, state.stop_requested = True, False
        self._draw_messages()
        gateway = self.chat.context.gateways.get(state.network_id)
        turn = Turn(state.network_id, gateway.model_id if gateway else "", len(full))
        state.turn = turn
        with self.log:
            _body, markdown = self._assistant_message("")
            waiting = ui.spinner("dots", size="lg", color="primary")
        self._streaming(True)
        shown = [""]

        def render() -> None:
            if turn.text != shown[0]:
                shown[0] = turn.text
                markdown.set_content(turn.text)
                waiting.set_visibility(False)
                ui.run_javascript("window.scrollTo(0, document.body.scrollHeight)")

        timer = ui.timer(RENDER_S, render)
        stopped = False
        try:
            async for _delta in self.chat.answer(
                state.network_id, state.session_id, full, state.settings, turn
            ):
                if state.stop_requested and not stopped:  # pressed before it started
                    stopped = await self.chat.stop(state.network_id, state.session_id)
        except ChatFailure as exc:
            timer.cancel()
            state.streaming = False
            self._streaming(False)
            waiting.set_visibility(False)
            failed = _("The answer failed.")
            markdown.set_content(f"**{failed}** {translate(exc.args[0])}")
            state.messages = full
            return
        timer.cancel()
        state.streaming = False
        state.messages = full + [{"role": "assistant", "content": turn.text}]
        state.window_start = turn.window_start
        state.answers[turn.message_index] = turn.answer()
        self._streaming(False)
        self._draw_messages()
        ui.run_javascript("window.scrollTo(0, document.body.scrollHeight)")
        if new:
            self.network.disable()
            ui.navigate.history.replace(f"/chat?net={state.network_id}&id={state.session_id}")
        background_tasks.create(self._list_conversations(), name="list conversations")

    def _streaming(self, on: bool) -> None:
        self.send_button.set_visibility(not on)
        self.stop_button.set_visibility(on)


def _saved_settings() -> Settings:
    """The settings this person saved last (in this node's storage of their login)."""
    return settings_from(app.storage.user.get(SETTINGS_KEY) or {})


def _cancel_save(dialog: ui.dialog, save) -> None:
    with ui.row().classes("w-full justify-end"):
        ui.button(_("Cancel"), on_click=dialog.close).props("flat no-caps")
        label = _("Save")
        ui.button(label, on_click=save).props(f'unelevated no-caps aria-label="{label}"')


def _slider(label: str, value: float, low: float, high: float, step: float) -> ui.slider:
    with ui.column().classes("w-full gap-0"):
        caption = ui.label(f"{label}: {number(value, 'g')}").classes("text-sm")
        slider = ui.slider(min=low, max=high, step=step, value=value).props(f'aria-label="{label}"')
        slider.on_value_change(lambda e: caption.set_text(f"{label}: {number(e.value, 'g')}"))
    return slider


def _figures(network: str | None, answer: Answer) -> str:
    parts = [p for p in (network, answer.model_id) if p]
    if answer.tokens_per_s:
        parts.append(_("{rate:.1f} tokens/s", rate=answer.tokens_per_s))
    if answer.first_token_ms is not None:
        parts.append(_("first token {seconds:.2f} s", seconds=answer.first_token_ms / 1000))
    parts.append(ngettext("{n} token", "{n} tokens", answer.tokens))
    if answer.finish_reason == "cancelled":
        parts.append(_("stopped"))
    elif answer.finish_reason == "length":
        parts.append(_("cut at the token limit"))
    return " · ".join(isolate(p) for p in parts)  # each part keeps its own direction


def _ago(when: float) -> str:
    seconds = max(0.0, time.time() - when)
    if seconds < 60:
        return _("just now")
    if seconds < 86400:
        return fmt_ago(seconds)
    return fmt_date(when)
