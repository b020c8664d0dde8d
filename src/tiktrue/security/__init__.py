"""Node identities, network CAs, TLS and block encryption."""
