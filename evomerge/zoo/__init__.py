"""evomerge.zoo."""
