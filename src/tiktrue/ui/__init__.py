"""People's apps: terminal chat (web UI to come)."""
