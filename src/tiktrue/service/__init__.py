"""The node process: composes block servers, the control channel, the admin controller
and the gateway. The only layer that wires the others together."""
