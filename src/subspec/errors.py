"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class SubspecError(Exception):
    """A user-facing error: bad input, missing files, an impossible budget."""
