"""evomerge.optimizer."""
