"""evomerge.fusion."""
