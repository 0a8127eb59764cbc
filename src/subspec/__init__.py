"""subspec: Substitute Speculative Decoding for models larger than fast memory."""

__version__ = "0.1.0"
