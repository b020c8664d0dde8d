"""The gateway's refusals and the chain's errors, each with its wire code
(``protocol_spec``): the APIs (``ws_api``, ``openai_api``, the chat) turn them into replies."""

from __future__ import annotations

from tiktrue.protocol import protocol_spec as ps


class ChainError(Exception):
    """A node of the chain answered with an error (or the gateway refused the request)."""

    def __init__(self, code: str, message: str, info: dict | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.info = info


class ContextLengthExceeded(ChainError):
    """The conversation does not fit the network's context: refused before any step."""

    def __init__(self, context_length: int, prompt_tokens: int) -> None:
        super().__init__(
            ps.CONTEXT_LENGTH_EXCEEDED,
            f"This model's maximum context length is {context_length} tokens. However, your "
            f"messages resulted in {prompt_tokens} tokens, which leaves no room for an answer. "
            "Please reduce the length of the messages.",
            {"context_length": context_length, "prompt_tokens": prompt_tokens},
        )
        self.context_length = context_length
        self.prompt_tokens = prompt_tokens
