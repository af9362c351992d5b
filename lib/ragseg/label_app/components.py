"""Models, index and caches of one app instance, loaded lazily and shared by its tasks.

A model that cannot load (missing weights) is not an app failure: the app starts, ``/info``
reports the reason and the fetch command, and requests that need the model get that message.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from ..embedders import Embedder
from ..errors import RagsegError
from ..factory import ModelConfig, ModelSet
from ..index import SliceIndex
from ..litemedsam import IMAGE_SIZE as LITEMEDSAM_IMAGE_SIZE
from ..pipeline import Preprocess, SegmentationEngine, Segmenter, open_index
from .config import AppConfig

DECODER_TASK = "ragseg_decoder"  # the train task's name; its decoder lives in <index_dir>/decoders/<name>

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
        self.model_runs = threading.BoundedSemaphore(cfg.infer_concurrency)  # segmentations at once
        self._embedder: Embedder | None = None
        self._engine: SegmentationEngine | None = None
        self._index: SliceIndex | None = None
        self._decoder_stamp: tuple[str, float] | None = None
        self.errors: dict[str, str] = {}
        self.models = ModelSet(self.model_config())  # decides the backend (cheap: checks files only)

    def model_config(self) -> ModelConfig:
        c = self.cfg
        return ModelConfig(backend=c.backend, retrieval=c.retrieval, location_prior=c.location_prior,
                           max_regions=c.max_regions, area_cap=c.area_cap, region_score=c.region_score, sam2=c.sam2_checkpoint, sam2_variant=c.sam2_variant,
                           dinov2=c.dinov2, pooling=c.pooling, image_size=c.image_size, device=c.device,
                           random_weights=c.random_weights_for_testing, memory_cache=str(self.index_dir / "memories"),
                           feature_cache=str(Path(c.feature_cache).expanduser()) if c.feature_cache else None)

    @property
    def backend(self) -> str:
        return self.models.backend

    def decoder_dir(self) -> Path | None:
        """The fine-tuned decoder the litemedsam backend uses: --conf decoder, or the trained one."""
        d = self.cfg.decoder
        if d == "none":
            return None
        if d == "auto":
            p = self.index_dir / "decoders" / DECODER_TASK
            return p if (p / "manifest.json").exists() else None
        return Path(d).expanduser()

    def _load(self, attr: str, key: str, loader, what: str):
        """Build a model once; on failure record why (for /info) and raise ModelUnavailable."""
        with self._lock:
            if getattr(self, attr) is None:
                try:
                    setattr(self, attr, loader())
                    self.errors.pop(key, None)
                except RagsegError as e:
                    self.errors[key] = str(e)
                    raise ModelUnavailable(f"{what}: {e}") from e
            return getattr(self, attr)

    def embedder(self) -> Embedder:
        return self._load("_embedder", "embedder", self.models.embedder, "retrieval embedder unavailable")

    def engine(self) -> SegmentationEngine:
        if self.backend == "rag-sam2":
            return self._load("_engine", "engine", self.models.engine, "SAM 2 unavailable")
        eng = self._load("_engine", "engine", lambda: self.models.lite_engine(None), "LiteMedSAM unavailable")
        self._refresh_decoder(eng)
        return eng

    def _refresh_decoder(self, eng) -> None:
        """Use the newest fine-tuned decoder (the train task writes it from another process)."""
        from ..fewshot import LiteMedSamAdapter, PrototypeDecoder

        d = self.decoder_dir()
        stamp = None
        if d is not None:
            try:
                stamp = (str(d), (d / "manifest.json").stat().st_mtime)
            except OSError:
                stamp = None
                self.errors["decoder"] = f"--conf decoder {d}: no manifest.json there; segmenting training-free"
        with self._lock:
            if stamp == self._decoder_stamp:
                return
            if stamp is None:
                eng.set_decoder(None)
                if d is None:
                    self.errors.pop("decoder", None)
            else:
                try:
                    dec, man = PrototypeDecoder.load(d, LiteMedSamAdapter(eng.lite))
                    eng.set_decoder(dec)
                    self.decoder_manifest = {k: man.get(k) for k in ("labels", "best_metric", "epochs", "created",
                                                                     "data_checksum")}
                    self.errors.pop("decoder", None)
                    logger.info("using fine-tuned decoder %s", d)
                except RagsegError as e:  # a bad decoder must not stop training-free segmentation
                    eng.set_decoder(None)
                    self.errors["decoder"] = str(e)
                    logger.warning("fine-tuned decoder unusable, segmenting training-free: %s", e)
            self._decoder_stamp = stamp

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
        blocking = {k: v for k, v in self.errors.items() if k != "decoder"}
        usable = not blocking and self._engine is not None and self._embedder is not None
        st: dict = {
            "backend": self.backend,
            "backend_reason": self.models.backend_reason,
            "retrieval": self.models.retrieval or c.retrieval,
            "retrieval_reason": self.models.retrieval_reason,
            "mode": ("memory attention" if self.backend == "rag-sam2" else
                     "fine-tuned prototype decoder" if getattr(self._engine, "decoder", None) is not None
                     else "training-free prototype boxes"),
            "usable": usable,
            "reasons": dict(self.errors),
            "random_weights": c.random_weights_for_testing,
            "sam2": c.sam2_checkpoint, "dinov2": c.dinov2, "k": c.k,
            # the input size of the model actually serving (LiteMedSAM's is fixed)
            "image_size": c.image_size if self.backend == "rag-sam2" else LITEMEDSAM_IMAGE_SIZE,
        }
        if c.random_weights_for_testing:
            st["warning"] = "RANDOM WEIGHTS (random_weights_for_testing=true): masks are meaningless; tests only"
        if self._decoder_stamp is not None:
            st["decoder"] = {"path": self._decoder_stamp[0], **getattr(self, "decoder_manifest", {})}
        if not usable and not blocking:
            st["reasons"] = {"loading": "models are still loading"}
        fc = self.models.feature_cache_stats()
        if fc is not None:
            st["feature_cache"] = fc
        if self._index is not None:
            st["index"] = {"slices": len(self._index), "images": len(self._index.images()),
                           "stale_reason": self._index.stale_reason, "path": str(self._index.path)}
        return st
