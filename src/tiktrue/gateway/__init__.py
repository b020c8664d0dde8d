"""Gateway: chain client, sessions, OpenAI-compatible API, client WebSocket."""
