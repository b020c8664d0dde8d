"""Model blocks: architecture catalog, block store, block engine, KV cache, sampling."""
