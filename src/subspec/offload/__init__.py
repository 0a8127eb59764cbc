"""Streaming decoder layers from a slow tier (disk, pinned host RAM) into fast memory.

``layer_file`` lays one layer's tensors out for aligned direct reads, ``stores`` reads them from
the slow tier, and ``prefetch`` overlaps those reads with compute through reused buffers.
"""

from subspec.offload.layer_file import (
    LayerManifest,
    TensorEntry,
    layer_path,
    read_manifest,
    read_manifests,
    tensors_from_buffer,
    write_layer_file,
)
from subspec.offload.prefetch import Prefetcher, PrefetchStats
from subspec.offload.stores import (
    DiskStore,
    PinnedHostStore,
    SlowStore,
    aligned_empty,
    drop_page_cache,
    measure_disk_bandwidth,
)

__all__ = [
    "DiskStore",
    "LayerManifest",
    "PinnedHostStore",
    "PrefetchStats",
    "Prefetcher",
    "SlowStore",
    "TensorEntry",
    "aligned_empty",
    "drop_page_cache",
    "layer_path",
    "measure_disk_bandwidth",
    "read_manifest",
    "read_manifests",
    "tensors_from_buffer",
    "write_layer_file",
]
