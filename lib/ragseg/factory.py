"""Build the engine and embedder from a typed model configuration (CLI and app share it)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import defaults
from .embedders import DinoV2Embedder, pick_device
from .engine import RagSam2Engine, SupportMemoryCache
from .errors import RagsegError
from .sam2_model import SAM2_CONFIGS, build_sam2, model_id

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("RAGSEG_CACHE_DIR", Path.home() / ".cache" / "ragseg"))


@dataclass
class ModelConfig:
    """Which weights to load and how to run them.

    sam2: registry name ('sam2.1-hiera-tiny'...) or path to an official SAM 2.1 ``.pt``.
    sam2_variant: config used with random weights ('hiera_t', 'hiera_s', 'hiera_b+', 'hiera_l').
    dinov2: registry name ('dinov2-small'...), Hugging Face hub id, or local model directory.
    pooling: DINOv2 pooling, 'cls' or 'mean'.
    image_size: SAM 2 input size (1024 official; smaller is faster, less accurate).
    device: 'auto', 'cpu' or 'cuda[:n]'.
    memory_cache: directory of cached support memories (None: RAM only).
    random_weights: TESTS AND BENCHMARKS ONLY. Build the same architectures with random weights.
    """

    sam2: str = "sam2.1-hiera-tiny"
    sam2_variant: str = "hiera_t"
    dinov2: str = "dinov2-small"
    pooling: str = "cls"
    image_size: int = defaults.SAM2_IMAGE_SIZE
    dinov2_image_size: int = defaults.DINOV2_IMAGE_SIZE
    device: str = "auto"
    memory_cache: str | None = None
    random_weights: bool = False
    seed: int = 0

    def validate(self) -> None:
        if self.sam2_variant not in SAM2_CONFIGS:
            raise RagsegError(f"sam2_variant: unknown {self.sam2_variant!r}; use one of {', '.join(SAM2_CONFIGS)}")
        if self.image_size % 32 or not 64 <= self.image_size <= 2048:
            raise RagsegError(f"image_size: must be a multiple of 32 in [64, 2048], got {self.image_size}")
        if self.pooling not in ("cls", "mean"):
            raise RagsegError(f"pooling: must be 'cls' or 'mean', got {self.pooling!r}")
        pick_device(self.device)


def load_embedder(cfg: ModelConfig) -> DinoV2Embedder:
    cfg.validate()
    if cfg.random_weights:
        logger.warning("DINOv2 with RANDOM weights (tests/benchmarks only): retrieval is meaningless")
        return DinoV2Embedder.random(seed=cfg.seed, pooling=cfg.pooling, image_size=min(cfg.dinov2_image_size, 112),
                                     device=cfg.device)
    return DinoV2Embedder.from_pretrained(cfg.dinov2, pooling=cfg.pooling, image_size=cfg.dinov2_image_size,
                                          device=cfg.device)


def load_engine(cfg: ModelConfig) -> RagSam2Engine:
    cfg.validate()
    device = pick_device(cfg.device)
    if cfg.random_weights:
        logger.warning("SAM 2 with RANDOM weights (tests/benchmarks only): masks are meaningless")
        model = build_sam2(cfg.sam2_variant, image_size=cfg.image_size, device=device, random_weights=True,
                           seed=cfg.seed)
        mid = model_id(cfg.sam2_variant, cfg.image_size, seed=cfg.seed)
    else:
        model = build_sam2(cfg.sam2_variant, checkpoint=cfg.sam2, image_size=cfg.image_size, device=device)
        mid = model_id(cfg.sam2_variant, cfg.image_size, checkpoint=cfg.sam2)
    cache = SupportMemoryCache(cfg.memory_cache)
    return RagSam2Engine(model, model_id=mid, cache=cache)


def set_threads() -> None:
    """Use every core for intra-op parallelism (torch defaults can be lower in containers)."""
    n = os.cpu_count() or 1
    if torch.get_num_threads() < n:
        torch.set_num_threads(n)
