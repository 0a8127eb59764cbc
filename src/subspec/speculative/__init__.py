"""Speculative decoding: the draft tree, drafters, verification, sampling, decoding loops."""
