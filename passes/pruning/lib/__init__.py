"""Libraries of the pruning passes: channel spaces, per-op channel rules, the channel dependency graph."""
