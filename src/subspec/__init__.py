"""subspec: Substitute Speculative Decoding for models larger than fast memory."""

__version__ = "0.1.0"

__all__ = ["LLM", "Chunk", "Completion", "TokenLogprob", "load"]


def __getattr__(name: str):
    """The Python API (subspec/api.py), imported on first use: `import subspec` stays light
    (`subspec plan` runs without torch)."""
    if name in __all__:
        from subspec import api

        return getattr(api, name)
    raise AttributeError(f"module 'subspec' has no attribute {name!r}")
