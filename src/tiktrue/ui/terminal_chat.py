"""``tiktrue chat``: a terminal chat with streaming, talking to a gateway's OpenAI API."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx

from tiktrue.paths import run_file

HELP = "commands: /reset (new conversation), /system TEXT (set the system prompt), /exit"


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
    api_url: str, messages: list[dict], model: str | None, api_key: str | None = None, **settings
) -> Iterator[str]:
    """Yield the text deltas of one streamed chat completion."""
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
        ) as reply:
            if reply.status_code != 200:
                reply.read()
                raise ChatError(f"the gateway answered {reply.status_code}: {reply.text}")
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
        raise ChatError(f"cannot reach the gateway at {api_url}: {exc}") from exc


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
    **settings,
) -> None:
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    listed = httpx.get(f"{api_url}/models", headers=_headers(api_key), timeout=10)
    if listed.status_code != 200:
        raise ChatError(f"the gateway answered {listed.status_code}: {listed.text}")
    models = listed.json()["data"]
    names = ", ".join(m["id"] for m in models)
    print(f"TikTrue chat with {model or names} via {api_url}  ({HELP})")
    while True:
        try:
            line = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            print("(new conversation)")
            continue
        if line.startswith("/system"):
            messages = [{"role": "system", "content": line[7:].strip()}] + [
                m for m in messages if m["role"] != "system"
            ]
            continue
        messages.append({"role": "user", "content": line})
        sys.stdout.write("model> ")
        answer = []
        while True:
            try:
                for delta in stream_chat(api_url, messages, model, api_key, **settings):
                    answer.append(delta)
                    sys.stdout.write(delta)
                    sys.stdout.flush()
            except ChatError as exc:
                if not answer and CONTEXT_FULL in str(exc) and drop_oldest_turn(messages):
                    continue  # the conversation goes on without its oldest turn
                print(f"\n(error: {exc})")
                messages.pop()
                break
            except KeyboardInterrupt:
                print("\n(stopped)")
            print()
            messages.append({"role": "assistant", "content": "".join(answer)})
            break
