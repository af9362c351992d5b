"""Batch inference that resumes, optionally on a Ray cluster.

MONAI Label's ``POST /batch/infer/<model>?images=unlabeled`` re-labels every image without a
final label, so an interrupted run starts over. Here 'unlabeled' means "no final and no original
label" (``redo: true`` in params restores MONAI Label's meaning). The batch runs in MONAI Label's
subprocess, which builds its own app instance; it shares the on-disk index.

With ``--conf ray_address`` (local datastores), 'unlabeled' batches go to
:func:`ragseg.scale.label_ray` instead: the same workers, snapshot and label writing as
``ragseg label-all --ray``, learning from the app's own index. Other image selections run here.
"""

from __future__ import annotations

import logging
from pathlib import Path

from monailabel.interfaces.tasks.batch_infer import BatchInferImageType, BatchInferTask

logger = logging.getLogger(__name__)


class ResumableBatchInfer(BatchInferTask):
    """Args:
        services: the app's services; with ``cfg.ray_address`` set, unlabeled batches run on Ray.
    """

    def __init__(self, services=None):
        super().__init__()
        self.services = services

    def get_images(self, request, datastore):
        images = request.get("images", BatchInferImageType.IMAGES_ALL)
        if images == BatchInferImageType.IMAGES_UNLABELED and not request.get("redo", False):
            done = set(datastore.get_labeled_images("original") or [])
            return [i for i in datastore.get_unlabeled_images() if i not in done]
        return super().get_images(request, datastore)

    def __call__(self, request, datastore, infer):
        s = self.services
        if (s is None or not s.cfg.ray_address or not s.is_local()
                or request.get("images") != BatchInferImageType.IMAGES_UNLABELED):
            return super().__call__(request, datastore, infer)
        return self.run_on_ray(request, datastore)

    def run_on_ray(self, request, datastore) -> dict:
        from ..scale import RayOptions, label_ray

        s = self.services
        comp = s.components
        cfg = comp.model_config()
        dec = comp.decoder_dir()
        cfg.decoder = str(dec) if dec is not None and comp.backend == "litemedsam" else None
        opts = RayOptions(address=s.cfg.ray_address, actors=s.cfg.ray_actors, threads=s.cfg.ray_threads,
                          progress=False)
        k = int(request.get("k") or s.cfg.k)
        logger.info("batch infer on Ray at %s (k=%d)", s.cfg.ray_address, k)
        rep = label_ray(Path(s.studies), cfg, comp.pre, k=k, opts=opts, redo=bool(request.get("redo", False)),
                        pool=comp.index(), seg_kwargs={"allow_same_image": s.cfg.same_image_supports,
                                                        "propagate": s.cfg.propagate})
        logger.info("batch infer on Ray: %s", rep.summary())
        datastore.refresh()  # the workers wrote labels/original directly; let datastore.json know
        # the summary last: its presence tells callers the run, datastore.json included, is done
        rep.write(s.index_dir / "batch-ray-summary.json")
        out: dict = {i: {"label_tag": "original", "ray": True} for i in rep.done}
        out.update({i: {"error": e} for i, e in rep.failed.items()})
        return out
