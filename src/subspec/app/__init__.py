"""The user-facing commands: the CLI, the terminal chat and the OpenAI-compatible server."""
