"""Few-shot medical image annotation with retrieval-augmented SAM 2."""

__version__ = "0.1.0"
