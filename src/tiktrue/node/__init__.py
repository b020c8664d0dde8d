"""The node service: block servers, one per joined network."""
