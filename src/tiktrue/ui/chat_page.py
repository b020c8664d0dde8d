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
            ui.notify("The admin pages are for administrators only.", type="warning")


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
                ui.notify("That conversation is not yours or no longer exists.", type="warning")
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
            ui.button("New chat", icon="edit_square", on_click=self.new_chat).props(
                'unelevated no-caps aria-label="New chat"'
            ).classes("w-full")
            self.search = (
                ui.input(placeholder="Search conversations")
                .props('dense outlined clearable aria-label="Search conversations"')
                .classes("w-full")
            )
            self.search.on("update:model-value", self._list_conversations, throttle=0.3)
            self.conversations = ui.column().classes("w-full gap-0")

    def _top_bar(self, networks: dict[str, str]) -> None:
        if self.state.network_id and self.state.network_id not in networks:
            networks = {**networks, self.state.network_id: f"{self.state.network_id} (away)"}
        with ui.row().classes("tt-chat items-center gap-2 px-2 no-wrap"):
            locked = self.state.session_id is not None
            self.network = ui.select(
                networks,
                value=self.state.network_id,
                label="Network · model",
                on_change=lambda e: setattr(self.state, "network_id", e.value),
            ).props('dense outlined options-dense aria-label="Network and model"')
            self.network.classes("flex-1 max-w-md")
            if locked:
                self.network.disable()
                self.network.tooltip("A conversation stays on the network it began on")
            ui.space()
            ui.button(icon="tune", on_click=self._settings_dialog).props(
                'flat round aria-label="Settings"'
            ).tooltip("System prompt and generation settings")

    def _footer(self, has_network: bool) -> None:
        with ui.footer().classes("tt-footer p-0"), ui.column().classes("tt-chat px-3 pt-2 pb-3"):
            with ui.row().classes("w-full items-end gap-2 no-wrap tt-card px-3 py-1"):
                self.input = (
                    ui.textarea(placeholder="Message TikTrue ...")
                    .props('autogrow borderless dense aria-label="Message"')
                    .classes("flex-1 text-base")
                )
                self.input.on(
                    "keydown",
                    self.send,
                    js_handler="(e) => { if (e.key === 'Enter' && !e.shiftKey "
                    "&& !e.isComposing) { e.preventDefault(); emit(); } }",
                )
                self.send_button = ui.button(icon="arrow_upward", on_click=self.send).props(
                    'round unelevated aria-label="Send"'
                )
                self.stop_button = ui.button(icon="stop", on_click=self.stop).props(
                    'round unelevated color=negative aria-label="Stop"'
                )
                self.stop_button.set_visibility(False)
            ui.label(
                "Answers come from the model your network runs; check what matters."
                if has_network
                else "No network answers on this PC yet."
            ).classes("tt-meta text-center w-full")
        if not has_network:
            self.input.disable()
            self.send_button.disable()

    # --- the conversation list ---------------------------------------------------------------

    async def _list_conversations(self, *_) -> None:
        items = await self.chat.conversations(self.search.value or "")
        self.conversations.clear()
        with self.conversations:
            if not items:
                ui.label("No conversations yet." if not self.search.value else "Nothing found.")
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
                title = item.title or "New chat"
                with row:
                    with (
                        ui.column()
                        .classes("gap-0 flex-1 min-w-0")
                        .on("click", lambda _, i=item: self.open(i.network_id, i.session_id))
                    ):
                        ui.label(title).classes("truncate w-full text-sm")
                        ui.label(_ago(item.updated_at)).classes("tt-meta")
                    with (
                        ui.button(icon="more_horiz").props(
                            f'flat round dense size=sm aria-label="More for {title}"'
                        ),
                        ui.menu(),
                    ):
                        ui.menu_item("Rename", on_click=lambda i=item: self._rename_dialog(i))
                        ui.menu_item("Delete", on_click=lambda i=item: self._delete_dialog(i))

    def open(self, network_id: str, session_id: str) -> None:
        ui.navigate.to(f"/chat?net={network_id}&id={session_id}")

    def new_chat(self) -> None:
        ui.navigate.to("/chat")

    def _rename_dialog(self, item) -> None:
        with ui.dialog() as dialog, ui.card().classes("w-96"):
            ui.label("Rename conversation").classes("text-lg font-medium")
            name = ui.input("Title", value=item.title or "").props("outlined autofocus")
            name.classes("w-full")

            async def save() -> None:
                await self.chat.rename(item.network_id, item.session_id, name.value or "")
                dialog.close()
                await self._list_conversations()

            with ui.row().classes("w-full justify-end"):
                ui.button("Cancel", on_click=dialog.close).props("flat no-caps")
                ui.button("Save", on_click=save).props('unelevated no-caps aria-label="Save"')
        dialog.open()

    def _delete_dialog(self, item) -> None:
        with ui.dialog() as dialog, ui.card().classes("w-96"):
            ui.label("Delete this conversation?").classes("text-lg font-medium")
            ui.label(item.title or "New chat").classes("tt-muted")

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
                ui.button("Cancel", on_click=dialog.close).props("flat no-caps")
                ui.button("Delete", on_click=delete).props(
                    'unelevated no-caps color=negative aria-label="Delete"'
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
            ui.label("Settings").classes("text-lg font-medium")
            system = ui.textarea("System prompt", value=s.system_prompt).props("outlined")
            system.classes("w-full")
            sliders = {
                "temperature": _slider(
                    "Temperature", shown("temperature"), 0.0, limits.MAX_TEMPERATURE, 0.05
                ),
                "top_p": _slider("Top p", shown("top_p"), 0.05, 1.0, 0.05),
                "top_k": _slider("Top k", shown("top_k"), 0, 100, 1),
                "min_p": _slider("Min p", shown("min_p"), 0.0, 1.0, 0.01),
                "repetition_penalty": _slider(
                    "Repetition penalty", shown("repetition_penalty"), 1.0, 2.0, 0.05
                ),
            }
            tokens = ui.number("Max tokens per answer", value=s.max_tokens, min=1, max=8192)
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
                ui.button("Model's defaults", on_click=the_models).props(
                    'flat no-caps aria-label="Model\'s defaults"'
                ).tooltip("The settings the model recommends")
                ui.space()
                ui.button("Cancel", on_click=dialog.close).props("flat no-caps")
                ui.button("Save", on_click=save).props('unelevated no-caps aria-label="Save"')
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
                    body, _ = self._assistant_message(message["content"])
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
            ui.label("How can I help?").classes("text-2xl font-semibold")
            networks = self.chat.networks()
            if networks:
                who = networks.get(self.state.network_id, "")
                ui.label(f"{who} answers, on the PCs of your network.").classes("tt-muted")
            elif self.user.role == "admin":
                ui.label("This PC is in no network that answers yet.").classes("tt-muted")
                ui.button("Set up this PC", on_click=lambda: ui.navigate.to("/setup")).props(
                    'unelevated no-caps aria-label="Set up this PC"'
                )
            else:
                ui.label("No network answers on this PC yet: ask your administrator.").classes(
                    "tt-muted"
                )

    def _user_message(self, index: int, text: str) -> None:
        with ui.column().classes("w-full items-end gap-1") as box:
            ui.label(text).classes("tt-user")
            ui.button(icon="edit", on_click=lambda: self._edit(box, index, text)).props(
                'flat round dense size=sm aria-label="Edit and resend"'
            ).classes("text-grey-6").tooltip("Edit and send again")

    def _assistant_message(self, text: str) -> tuple[ui.column, ui.markdown]:
        with ui.row().classes("w-full no-wrap gap-3 items-start"):
            ui.avatar("hub", color="primary", text_color="white", size="sm").classes("mt-1")
            with ui.column().classes("flex-1 min-w-0 gap-1") as body:
                markdown = ui.markdown(text).classes("tt-answer w-full")
        return body, markdown

    def _answer_meta(self, body: ui.column, index: int, *, last: bool) -> None:
        answer = self.state.answers.get(index)
        gateway = self.chat.context.gateways.get(self.state.network_id or "")
        network = gateway.config.name if gateway is not None else self.state.network_id
        with body, ui.row().classes("items-center gap-1 tt-meta"):
            if answer is not None:
                ui.label(_figures(network, answer)).classes("mr-2")
            self._thumb(index, 1, answer)
            self._thumb(index, -1, answer)
            text = self.state.messages[index]["content"]
            ui.button(icon="content_copy", on_click=lambda: copy_text(text)).props(
                'flat round dense size=sm aria-label="Copy"'
            ).classes("text-grey-7").tooltip("Copy")
            if last:
                ui.button(icon="refresh", on_click=self.regenerate).props(
                    'flat round dense size=sm aria-label="Regenerate"'
                ).classes("text-grey-7").tooltip("Regenerate")

    def _thumb(self, index: int, rating: int, answer: Answer | None) -> None:
        chosen = answer is not None and answer.rating == rating
        icon = "thumb_up" if rating > 0 else "thumb_down"
        name = "Good answer" if rating > 0 else "Bad answer"

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
            editor = ui.textarea(value=text).props('outlined autogrow aria-label="Edit message"')
            editor.classes("w-full")

            async def resend() -> None:
                messages = self.state.messages[:index]
                messages.append({"role": "user", "content": editor.value or ""})
                await self._run_turn(messages)

            with ui.row().classes("gap-2"):
                ui.button("Cancel", on_click=self._draw_messages).props("flat no-caps")
                ui.button("Send", on_click=resend).props(
                    'unelevated no-caps aria-label="Send edited message"'
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
            ui.notify("No network answers on this PC yet.", type="warning")
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
            _, markdown = self._assistant_message("")
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
            async for _ in self.chat.answer(
                state.network_id, state.session_id, full, state.settings, turn
            ):
                if state.stop_requested and not stopped:  # pressed before it started
                    stopped = await self.chat.stop(state.network_id, state.session_id)
        except ChatFailure as exc:
            timer.cancel()
            state.streaming = False
            self._streaming(False)
            waiting.set_visibility(False)
            markdown.set_content(f"**The answer failed.** {exc}")
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


def _slider(label: str, value: float, low: float, high: float, step: float) -> ui.slider:
    with ui.column().classes("w-full gap-0"):
        caption = ui.label(f"{label}: {value:g}").classes("text-sm")
        slider = ui.slider(min=low, max=high, step=step, value=value).props(f'aria-label="{label}"')
        slider.on_value_change(lambda e: caption.set_text(f"{label}: {e.value:g}"))
    return slider


def _figures(network: str | None, answer: Answer) -> str:
    parts = [f"{network} · {answer.model_id}"]
    if answer.tokens_per_s:
        parts.append(f"{answer.tokens_per_s:.1f} tokens/s")
    if answer.first_token_ms is not None:
        parts.append(f"first token {answer.first_token_ms / 1000:.2f} s")
    parts.append(f"{answer.tokens} tokens")
    if answer.finish_reason == "cancelled":
        parts.append("stopped")
    elif answer.finish_reason == "length":
        parts.append("cut at the token limit")
    return " · ".join(parts)


def _ago(when: float) -> str:
    seconds = max(0.0, time.time() - when)
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h ago"
    return time.strftime("%Y-%m-%d", time.localtime(when))
