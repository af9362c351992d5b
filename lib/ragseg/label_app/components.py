"""Models, index and caches of one app instance, loaded lazily and shared by its tasks.

A model that cannot load (missing weights) is not an app failure: the app starts, ``/info``
reports the reason and the fetch command, and requests that need the model get that message.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from ..embedders import Embedder
from ..engine import RagSam2Engine
from ..errors import RagsegError
from ..factory import ModelConfig, load_embedder, load_engine
from ..index import SliceIndex
from ..pipeline import Preprocess, Segmenter, open_index
from .config import AppConfig

logger = logging.getLogger(__name__)


class ModelUnavailable(RagsegError):
    """A model needed for this request cannot be loaded; the message says why and how to fix it."""


class Components:
    """Lazily built embedder, engine and index for an :class:`AppConfig`."""

    def __init__(self, cfg: AppConfig, index_dir: Path):
        self.cfg = cfg
        self.index_dir = Path(index_dir)
        self.pre = Preprocess(axis=cfg.axis, modality=cfg.modality, ct_window=cfg.ct_window)
        self._lock = threading.RLock()
        self._embedder: Embedder | None = None
        self._engine: RagSam2Engine | None = None
        self._index: SliceIndex | None = None
        self.errors: dict[str, str] = {}

    def model_config(self) -> ModelConfig:
        c = self.cfg
        return ModelConfig(sam2=c.sam2_checkpoint, sam2_variant=c.sam2_variant, dinov2=c.dinov2, pooling=c.pooling,
                           image_size=c.image_size, device=c.device, random_weights=c.random_weights_for_testing,
                           memory_cache=str(self.index_dir / "memories"))

    def _load(self, attr: str, key: str, loader, what: str):
        """Build a model once; on failure record why (for /info) and raise ModelUnavailable."""
        with self._lock:
            if getattr(self, attr) is None:
                try:
                    setattr(self, attr, loader(self.model_config()))
                    self.errors.pop(key, None)
                except RagsegError as e:
                    self.errors[key] = str(e)
                    raise ModelUnavailable(f"{what}: {e}") from e
            return getattr(self, attr)

    def embedder(self) -> Embedder:
        return self._load("_embedder", "embedder", load_embedder, "retrieval embedder unavailable")

    def engine(self) -> RagSam2Engine:
        return self._load("_engine", "engine", load_engine, "SAM 2 unavailable")

    def index(self) -> SliceIndex:
        with self._lock:
            if self._index is None:
                self._index = open_index(self.index_dir / "index", self.embedder(), self.pre)
            return self._index

    def segmenter(self, *, k: int | None = None, same_image: bool | None = None,
                  propagate: bool | None = None) -> Segmenter:
        c = self.cfg
        problems = []
        for fn in (self.embedder, self.engine):  # report every missing model at once
            try:
                fn()
            except ModelUnavailable as e:
                problems.append(str(e))
        if problems:
            raise ModelUnavailable("; ".join(problems))
        return Segmenter(self.engine(), self.embedder(), self.index(), self.pre, k=k or c.k,
                         allow_same_image=c.same_image_supports if same_image is None else same_image,
                         propagate=c.propagate if propagate is None else propagate)

    def warm_up(self) -> None:
        """Load everything (errors are recorded for /info, not raised)."""
        for fn in (self.embedder, self.engine, self.index):
            try:
                fn()
            except RagsegError as e:
                logger.warning("%s", e)

    def status(self) -> dict:
        """What /info shows: which backend, whether it is usable, and why not."""
        c = self.cfg
        usable = not self.errors and self._engine is not None and self._embedder is not None
        st: dict = {
            "backend": c.backend,
            "usable": usable,
            "reasons": dict(self.errors),
            "random_weights": c.random_weights_for_testing,
            "sam2": c.sam2_checkpoint, "dinov2": c.dinov2, "image_size": c.image_size, "k": c.k,
        }
        if c.random_weights_for_testing:
            st["warning"] = "RANDOM WEIGHTS (random_weights_for_testing=true): masks are meaningless; tests only"
        if not usable and not self.errors:
            st["reasons"] = {"loading": "models are still loading"}
        if self._index is not None:
            st["index"] = {"slices": len(self._index), "images": len(self._index.images()),
                           "stale_reason": self._index.stale_reason, "path": str(self._index.path)}
        return st
