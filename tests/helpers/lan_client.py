"""A client on another host of a ``VirtualLan`` (run there: ``python -m tests.helpers.lan_client
...``), printing one JSON line. What a person's PC does with a gateway of the LAN:

- ``probe BASE CAFILE``: ``https://`` ``/health`` trusting CAFILE; and whether anything
  answers in clear (``http://``) on the same port: ``/health``, ``/login``, ``/v1/models``;
- ``chat BASE CAFILE KEY MESSAGES_JSON [--until-answered S]``: one streamed chat completion
  with the official OpenAI client, its HTTP client trusting CAFILE (as the README shows); with
  ``--until-answered``, tried again until it answers (a network healing after a lost PC) or
  S seconds pass.
"""

from __future__ import annotations

import json
import sys
import time

import httpx


def probe(base: str, cafile: str) -> dict:
    health = httpx.get(f"{base}/health", verify=cafile, timeout=30).json()
    clear = {}
    plain = base.replace("https://", "http://")
    for path in ("/health", "/login", "/v1/models"):
        try:
            reply = httpx.get(f"{plain}{path}", timeout=30)
            clear[path] = reply.status_code
        except httpx.TransportError as exc:
            clear[path] = type(exc).__name__
    return {"health": health, "clear": clear}


def chat(base: str, cafile: str, key: str, messages: list[dict], until: float = 0.0) -> dict:
    from openai import APIConnectionError, APIStatusError, OpenAI

    client = OpenAI(
        base_url=f"{base}/v1",
        api_key=key,
        http_client=httpx.Client(verify=cafile, timeout=120),
        max_retries=0,
    )
    deadline, tries, errors = time.monotonic() + until, 0, []
    while True:
        tries += 1
        try:
            stream = client.chat.completions.create(
                model=client.models.list().data[0].id,
                messages=messages,
                stream=True,
                temperature=0,
                max_tokens=8,
            )
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            return {"text": text, "tries": tries, "errors": errors[-3:]}
        except (APIStatusError, APIConnectionError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
            if time.monotonic() > deadline:
                return {"text": None, "tries": tries, "errors": errors[-3:]}
            time.sleep(1.0)


def main(argv: list[str]) -> None:
    if argv[0] == "probe":
        result = probe(argv[1], argv[2])
    else:
        until = float(argv[argv.index("--until-answered") + 1]) if "--until-answered" in argv else 0
        result = chat(argv[1], argv[2], argv[3], json.loads(argv[4]), until)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
