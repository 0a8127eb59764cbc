"""Streaming weights from a slow tier (disk, pinned host RAM) into fast memory.

``planner`` decides what streams, ``layer_file`` lays a unit's tensors out for aligned direct
reads, ``stores`` read them from the slow tier, ``prefetch`` overlaps those reads with compute
through reused buffers, and ``streamed`` hands them to the forward pass.
"""
