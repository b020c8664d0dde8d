"""Wire protocol: message models (protocol_spec) and binary tensor frames."""
