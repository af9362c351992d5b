"""What an app instance owns besides its tasks: config, models, re-indexer, label names.

``apps/ragseg/main.py`` composes tasks from these; this module holds the plumbing so that file
stays a list of tasks.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from fastapi import HTTPException

from .components import Components
from .config import AppConfig
from .dicomweb import is_dicomweb, seg_writing
from .reindex import Reindexer
from .strategy import EmbeddingWarmer, SliceEmbeddingCache

logger = logging.getLogger(__name__)

NAMES_TTL_S = 5.0


class Services:
    """Config, components and the background re-indexer of one app instance."""

    def __init__(self, conf: dict[str, str] | None, studies: str, app_dir: str):
        self.cfg = AppConfig.from_conf(conf)  # ConfigError names the bad key
        self.studies = studies
        self.index_dir = self.cfg.index_path(studies, app_dir)
        self.index_dir.mkdir(parents=True, exist_ok=True)
        self.components = Components(self.cfg, self.index_dir)
        self.datastore = None
        self.reindexer: Reindexer | None = None
        # slice embeddings of unlabeled images for the diversity strategy, filled in the background
        self.embed_cache = SliceEmbeddingCache(self.components)
        self.warmer = EmbeddingWarmer(self.components, None, self.embed_cache,
                                      interval=max(self.cfg.reconcile_interval, 10.0))
        self._started = False
        self._names_cache: tuple[float, dict[str, int]] | None = None

    def is_local(self) -> bool:
        return not self.studies.startswith(("http://", "https://"))

    def local_datastore(self):
        from monailabel.config import settings

        from .datastore import ValidatingLocalDatastore

        return ValidatingLocalDatastore(self.studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                                        auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                        read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def remote_datastore(self, datastore):
        """MONAI Label's remote datastore; a DICOMweb one writes SEGs with correct names and codes."""
        return seg_writing(datastore, lambda: dict(self.cfg.labels), attempts=self.cfg.pacs_attempts,
                           retry_wait_s=self.cfg.pacs_retry_wait)

    def start(self, datastore) -> None:
        """Server process only: load models and start re-indexing (never in train subprocesses)."""
        if self._started:
            return
        self._started = True
        self.datastore = datastore
        self.reindexer = Reindexer(self.components, datastore, interval=self.cfg.reconcile_interval)
        try:  # the web app exists only in the server process
            import monailabel.app

            from .ohif import install
            from .routes import install_job_route, offload_blocking_routes

            offload_blocking_routes(monailabel.app.app)
            install_job_route(monailabel.app.app, self.reindexer.job)
            install(monailabel.app.app)
        except Exception as e:  # the viewer and job route are extras; the API works without them
            logger.warning("could not install the app's routes: %s", e)

        self.warmer.datastore = datastore
        self.warmer.enabled = self.cfg.embed_unlabeled
        self.warmer.busy = self.reindexer.busy

        def boot():
            self.components.warm_up()
            self.reindexer.start()  # labels first: the warmer waits while re-indexing is busy
            if self.cfg.embed_unlabeled:
                self.warmer.start()

        threading.Thread(target=boot, name="ragseg-boot", daemon=True).start()

    def on_save_label(self, image_id: str) -> dict:
        if self.reindexer is None:  # not a server process (e.g. a CLI-built app): index synchronously later
            return {}
        job_id = self.reindexer.submit(image_id, "PUT /datastore/label")
        return {"job_id": job_id, "job_url": f"/ragseg/jobs/{job_id}", "indexing": "queued"}

    # -- label names -----------------------------------------------------------------------------
    def label_names(self) -> dict[str, int]:
        """--conf labels, plus names clients stored with saved labels (label_info), plus the pool.

        Cached for a few seconds: /info calls this, and on a DICOMweb datastore listing labels is a
        PACS query.
        """
        now = time.monotonic()
        if self._names_cache and now - self._names_cache[0] < NAMES_TTL_S:
            return dict(self._names_cache[1])
        names = self._label_names()
        self._names_cache = (now, names)
        return dict(names)

    def _label_names(self) -> dict[str, int]:
        names = dict(self.cfg.labels)
        if self.reindexer is not None and self.reindexer._dicomweb is not None:  # names found in SEGs
            for k, v in self.reindexer._dicomweb.extra_names.items():
                names.setdefault(k, int(v))
        ds = self.datastore
        if ds is not None:
            try:
                for image_id in ds.get_labeled_images("final"):
                    info = ds.get_label_info(image_id, "final") or {}
                    for li in info.get("label_info", []) or []:
                        if isinstance(li, dict) and "name" in li and "idx" in li:
                            names.setdefault(str(li["name"]), int(li["idx"]))
            except Exception as e:  # names are cosmetic; never fail a request on them
                logger.debug("label_info lookup failed: %s", e)
        try:
            taken = set(names.values())
            idx = self.components._index
            for v in sorted({v for r in idx.records() for v in r.labels}) if idx is not None else []:
                if v not in taken:
                    names[f"label_{v}"] = v
        except Exception:
            pass
        return dict(sorted(names.items(), key=lambda kv: kv[1]))

    def human_label(self, image_id: str) -> str | None:
        ds = self.datastore
        if ds is None:
            return None
        if is_dicomweb(ds):  # its get_label_uri wants the SEG id; use the label the re-indexer converted
            return self.reindexer._dicomweb.label_path(image_id) if self.reindexer else None
        try:
            p = ds.get_label_uri(image_id, "final")
        except Exception:
            return None
        return p if p and os.path.exists(p) else None

    def suggestion(self, image_id: str) -> dict | None:
        """The diversity strategy's suggestion stored in the image info, if any."""
        try:
            return (self.datastore.get_image_info(image_id) or {}).get("ragseg_suggestion") if self.datastore else None
        except Exception:
            return None

    # -- request checks ---------------------------------------------------------------------------
    @staticmethod
    def check_infer_request(request: dict, infers: dict, datastore) -> None:
        """4xx before MONAI Label turns these into a bare 500: unknown model, unknown image."""
        model = request.get("model")
        if model not in infers:
            raise HTTPException(404, f"unknown model {model!r}; available: {', '.join(sorted(infers))}")
        image = request.get("image")
        if isinstance(image, str) and image and not os.path.exists(image):
            try:
                uri = datastore.get_image_uri(image)
            except HTTPException:
                raise
            except Exception as e:  # a PACS that is down or refuses: say so, the server keeps serving
                raise HTTPException(503, f"cannot fetch image {image!r} from the image store "
                                         f"({type(e).__name__}: {e}); is the PACS reachable? Retry when it is") from e
            if not uri:
                raise HTTPException(404, f"unknown image id {image!r}: no such image in the datastore")
            request["ragseg_image_id"] = image
        elif isinstance(image, str) and image:
            request["ragseg_image_id"] = Path(image).name.split(".")[0]

    def status(self) -> dict:
        st = self.components.status()
        st["index_dir"] = str(self.index_dir)
        if self.reindexer is not None:
            st["reindex"] = self.reindexer.status()
        st["diversity"] = {"last_pass": self.warmer.last_pass, "failed": dict(self.warmer.failed)}
        return st
