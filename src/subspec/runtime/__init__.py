"""Building a runtime from a config, the runtime itself, and one request's session."""
