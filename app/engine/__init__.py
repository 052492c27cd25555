"""The queue engine: channels in memory, kept in step with the store."""
