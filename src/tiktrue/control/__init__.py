"""Control plane: network configs, and later discovery, planning and distribution."""
