"""``tiktrue chat``: a terminal chat with streaming, talking to a gateway's OpenAI API.

Its own words are in the terminal's language (:func:`terminal_language`): Persian only when
asked for (``--lang fa``, ``TIKTRUE_LANG``, or a POSIX locale such as ``LANG=fa_IR.UTF-8``),
because many terminals (the Windows console among them) do not lay out right-to-left text.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx

from tiktrue.paths import run_file
from tiktrue.ui import i18n
from tiktrue.ui.i18n import _

LANGUAGE_ENV = "TIKTRUE_LANG"


def terminal_language(asked: str | None = None) -> i18n.Language:
    """``asked`` (``--lang``), else ``TIKTRUE_LANG``, else the POSIX locale variables
    (``LANGUAGE``, ``LC_ALL``, ``LC_MESSAGES``, ``LANG``); English when none names ours."""
    for value in (asked, os.environ.get(LANGUAGE_ENV)):
        if value:
            return i18n.language(value) or i18n.SOURCE
    for name in ("LANGUAGE", "LC_ALL", "LC_MESSAGES", "LANG"):
        value = os.environ.get(name)
        if value:
            return i18n.language(value.split(":")[0].split(".")[0]) or i18n.SOURCE
    return i18n.SOURCE


class ChatError(Exception):
    pass


def local_api_url(data_dir: Path) -> str | None:
    """The API of the node service running from this data dir, if any."""
    path = run_file(data_dir)
    if path.is_file():
        return json.loads(path.read_text("utf-8")).get("api")
    return None


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def stream_chat(
    api_url: str,
    messages: list[dict],
    model: str | None,
    api_key: str | None = None,
    *,
    verify: ssl.SSLContext | bool = True,
    **settings,
) -> Iterator[str]:
    """Yield the text deltas of one streamed chat completion (``verify``: what an
    ``https://`` gateway's certificate must chain to, see ``gateway_tls.client_context``)."""
    # a setting not given is left out: the gateway takes the model's own
    body = {"messages": messages, "stream": True}
    body.update({k: v for k, v in settings.items() if v is not None})
    if model:
        body["model"] = model
    try:
        with httpx.stream(
            "POST",
            f"{api_url}/chat/completions",
            json=body,
            headers=_headers(api_key),
            timeout=300,
            verify=verify,
        ) as reply:
            if reply.status_code != 200:
                reply.read()
                raise ChatError(
                    _(
                        "the gateway answered {status}: {text}",
                        status=str(reply.status_code),
                        text=reply.text,
                    )
                )
            for line in reply.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise ChatError(chunk["error"]["message"])
                delta = chunk["choices"][0]["delta"].get("content")
                if delta:
                    yield delta
    except httpx.HTTPError as exc:
        raise ChatError(
            _("cannot reach the gateway at {url}: {detail}", url=api_url, detail=str(exc))
        ) from exc


CONTEXT_FULL = "context_length_exceeded"


def drop_oldest_turn(messages: list[dict]) -> bool:
    """Drop the conversation's oldest question and its answer (the system prompt stays, the
    last question too), as the gateway does for its own sessions: a chat in the terminal
    goes on when it outgrows the network's context. False: nothing left to drop."""
    first = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    following = next(
        (i for i in range(first + 1, len(messages)) if messages[i]["role"] == "user"), None
    )
    if following is None:
        return False
    del messages[first:following]
    return True


def run_chat(
    api_url: str,
    model: str | None = None,
    system: str | None = None,
    api_key: str | None = None,
    *,
    verify: ssl.SSLContext | bool = True,
    language: i18n.Language | None = None,
    **settings,
) -> None:
    with i18n.using(language or terminal_language()):
        _chat(api_url, model, system, api_key, verify=verify, **settings)


def _chat(
    api_url: str,
    model: str | None,
    system: str | None,
    api_key: str | None,
    *,
    verify: ssl.SSLContext | bool,
    **settings,
):
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    try:
        listed = httpx.get(
            f"{api_url}/models", headers=_headers(api_key), timeout=10, verify=verify
        )
    except httpx.HTTPError as exc:
        raise ChatError(
            _("cannot reach the gateway at {url}: {detail}", url=api_url, detail=str(exc))
        ) from exc
    if listed.status_code != 200:
        raise ChatError(
            _(
                "the gateway answered {status}: {text}",
                status=str(listed.status_code),
                text=listed.text,
            )
        )
    models = listed.json()["data"]
    names = ", ".join(m["id"] for m in models)
    help_text = _(
        "commands: {reset} (new conversation), {system} TEXT (set the system prompt), {exit}",
        reset="/reset",
        system="/system",
        exit="/exit",
    )
    print(
        _(
            "TikTrue chat with {model} via {url}  ({help})",
            model=model or names,
            url=api_url,
            help=help_text,
        )
    )
    while True:
        try:
            line = input("\n" + _("you> ")).strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            print(_("(new conversation)"))
            continue
        if line.startswith("/system"):
            messages = [{"role": "system", "content": line[7:].strip()}] + [
                m for m in messages if m["role"] != "system"
            ]
            continue
        messages.append({"role": "user", "content": line})
        sys.stdout.write(_("model> "))
        answer = []
        while True:
            try:
                for delta in stream_chat(
                    api_url, messages, model, api_key, verify=verify, **settings
                ):
                    answer.append(delta)
                    sys.stdout.write(delta)
                    sys.stdout.flush()
            except ChatError as exc:
                if not answer and CONTEXT_FULL in str(exc) and drop_oldest_turn(messages):
                    continue  # the conversation goes on without its oldest turn
                print("\n" + _("(error: {detail})", detail=str(exc)))
                messages.pop()
                break
            except KeyboardInterrupt:
                print("\n" + _("(stopped)"))
            print()
            messages.append({"role": "assistant", "content": "".join(answer)})
            break
