"""What happened on this node: the structured event log (and its webhook)."""
