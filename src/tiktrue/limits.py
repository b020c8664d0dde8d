"""Every limit of TikTrue, defined once: sampling settings, token ids, context and steps.

The OpenAI API, the wire protocol (``/ws`` and the block servers), the sampler, the planner
and the node all take their bounds and defaults from here, so a request that one front end
accepts is never refused or silently changed by another. A base module: the protocol, the
model and the gateway all import it, and it imports nothing of ours.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

# --- sampling (the OpenAI API's ranges, which clients already know) -------------------------
MAX_TEMPERATURE = 2.0
MAX_REPETITION_PENALTY = 10.0
# What a request leaves out when the model recommends nothing (its generation_config.json, a
# GGUF's general.sampling.* metadata, or the admin's settings for it say otherwise): llama.cpp's
# defaults (common.h: temp 0.80, top_k 40, top_p 0.95, min_p 0.05, penalty_repeat 1.00), which
# Ollama's are close to. Not OpenAI's temperature 1.0 / top_p 1.0, which small models answer
# with nonsense. 0 means greedy.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.95
DEFAULT_MIN_P = 0.05
DEFAULT_REPETITION_PENALTY = 1.0
DEFAULT_MAX_TOKENS = 512  # new tokens when a request names none (then bounded by the context)
MAX_NEW_TOKENS = 1 << 17
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1  # torch's generator takes any 64-bit seed; JSON clients keep 63 bits

# --- tokens ---------------------------------------------------------------------------------
MAX_TOKEN_ID = 2**31 - 1  # any vocabulary fits; a larger number is no token of any model
MAX_INPUT_TOKENS = 1 << 20  # ids in one request (the network's context refuses far fewer)

# --- context and steps ----------------------------------------------------------------------
# The KV cache a plan reserves on every node for one conversation, unless the admin chooses
# (``network plan --context``): as much as the nodes' RAM allows, up to the model's own context
# (``max_position_embeddings``), and at least MIN_AUTO_CONTEXT_TOKENS (or the model's own, when
# shorter). DEFAULT_CONTEXT_TOKENS: what a network config made before any plan says.
MIN_AUTO_CONTEXT_TOKENS = 2048
DEFAULT_CONTEXT_TOKENS = MIN_AUTO_CONTEXT_TOKENS
KV_PAGE_TOKENS = 16  # the KV cache allocates a session's room in pages of this many tokens
MIN_CONTEXT_TOKENS = KV_PAGE_TOKENS
MAX_CONTEXT_TOKENS = 1 << 20
# The most tokens one forward step carries. A tensor frame's JSON header lists a step's token
# ids once (the head needs them for the repetition penalty): the header's limit holds the most
# a step carries.
MAX_STEP_TOKENS = 4096
# The gateway sends a prompt through the chain in steps of this many tokens (at most
# MAX_STEP_TOKENS): each worker runs the other sessions' decode steps between two of them, so
# a long prompt delays their tokens by one chunk at a time; large enough for an efficient
# prefill.
PREFILL_CHUNK_TOKENS = 256
MAX_FRAME_HEADER_BYTES = 64 << 10

# --- priority classes (seed 001: quick / normal / deep) -------------------------------------
# A request's class decides the order in which each node's span worker takes queued work under
# load (never a session's tokens): a request names one, else its API key's or account's
# default applies, else DEFAULT_PRIORITY. Ranks: a lower rank goes first.
PRIORITIES = ("quick", "normal", "deep")
DEFAULT_PRIORITY = "normal"
PRIORITY_RANK = {name: rank for rank, name in enumerate(PRIORITIES)}

# --- the chain's links and deadlines ---------------------------------------------------------
# Every round trip on the chain has a deadline: a hung node must not hold its caller for ever.
# A step's is a ceiling, not an expectation (a prompt chunk of a big model on slow PCs takes
# seconds per node): a node that stops answering is found by the admin's heartbeats and by the
# links' own pings long before it.
STEP_DEADLINE_S = 300.0
CONTROL_DEADLINE_S = 60.0  # a session control message (open, close, save ...) on every node
# Every link between nodes pings its peer this often and drops when a pong takes longer than
# the timeout: a link whose cable was pulled (no TCP reset) is closed within their sum.
LINK_PING_INTERVAL_S = 1.0
LINK_PING_TIMEOUT_S = 3.0

# --- a caller that proved no certificate (a PC that has not joined; DESIGN.md §6) ------------
MAX_UNPROVED_MESSAGE_BYTES = 64 << 10  # one control-port message (a join request is ~1 KB)
MAX_PENDING_JOINS_PER_SOURCE = 4  # join requests waiting for approval from one address
MAX_PENDING_JOINS = 64  # ... and from every address together
MAX_NODE_NAME_CHARS = 64  # a PC's name in a join request
MAX_HOST_CHARS = 253  # an address or DNS name in a join request
# What one source address may cost a node's listening ports (security.connection_limits).
# Before the TLS handshake, for every caller (a node's own traffic from one PC stays far
# below: a few kept-open links, a few new connections a second when the admin re-plans):
MAX_CONNECTIONS_PER_SOURCE = 64  # open at once; more are closed at accept
HANDSHAKES_PER_SOURCE_S = 20.0  # new TLS handshakes a second, paced in arrival order ...
HANDSHAKE_BURST = 40  # ... after a burst of this many
MAX_HANDSHAKE_WAIT_S = 2.0  # a connection that would wait longer for its turn: closed
# Right after it, for a connection that showed no certificate, until it proves a key:
MAX_CERTLESS_PER_SOURCE = 8  # open at once (a joining PC needs one; the CLI one)
CERTLESS_REQUESTS_PER_SOURCE_S = 10.0  # requests a second, paced (a joiner polls once a second)
CERTLESS_REQUEST_BURST = 20
MAX_UNPROVED_CONNECTIONS = 256  # waiting for a handshake or cert-less, all sources together

# --- one client connection ------------------------------------------------------------------
MAX_MESSAGE_BYTES = 4 << 20  # a client's JSON message (a long prompt fits many times)
MAX_IN_FLIGHT_PER_CONNECTION = 32  # requests one /ws connection may have running at once


def kv_bytes_per_token_per_layer(num_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Keys and values of one token in one layer: what the planner reserves and the KV page
    pool allocates."""
    return 2 * num_kv_heads * head_dim * itemsize


# Pydantic field types, shared by the OpenAI API, the wire protocol and the sampler.
Temperature = Annotated[float, Field(ge=0.0, le=MAX_TEMPERATURE)]
TopK = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID, description="0 keeps every token")]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
MinP = Annotated[float, Field(ge=0.0, le=1.0, description="0 keeps every token")]
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=MAX_REPETITION_PENALTY)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
StopStrings = Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]
TokenId = Annotated[int, Field(strict=True, ge=0, le=MAX_TOKEN_ID)]
ContextTokens = Annotated[int, Field(ge=MIN_CONTEXT_TOKENS, le=MAX_CONTEXT_TOKENS)]
Priority = Literal[PRIORITIES]  # one of PRIORITIES (the same tuple: one definition)
