"""evomerge.search_spaces."""
