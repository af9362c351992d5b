"""Batch inference that resumes: 'unlabeled' skips images that already have an original label.

MONAI Label's ``POST /batch/infer/<model>?images=unlabeled`` re-labels every image without a
final label, so an interrupted run starts over. Here 'unlabeled' means "no final and no original
label" (``redo: true`` in params restores MONAI Label's meaning). The batch runs in MONAI Label's
subprocess, which builds its own app instance; it shares the on-disk index.
"""

from __future__ import annotations

from monailabel.interfaces.tasks.batch_infer import BatchInferImageType, BatchInferTask


class ResumableBatchInfer(BatchInferTask):
    def get_images(self, request, datastore):
        images = request.get("images", BatchInferImageType.IMAGES_ALL)
        if images == BatchInferImageType.IMAGES_UNLABELED and not request.get("redo", False):
            done = set(datastore.get_labeled_images("original") or [])
            return [i for i in datastore.get_unlabeled_images() if i not in done]
        return super().get_images(request, datastore)
