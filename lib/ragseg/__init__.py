"""Few-shot medical image annotation with retrieval-augmented SAM 2."""

from .allocator import tune as _tune_allocator

__version__ = "0.1.0"

_tune_allocator()  # before any tensor is allocated: CPU inference stops re-faulting its buffers
