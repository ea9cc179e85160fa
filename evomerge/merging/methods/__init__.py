"""evomerge.merging.methods: one module per merge method (kernel + parameter defaults)."""
