"""A local datastore that validates labels before accepting them and writes them atomically.

MONAI Label's ``PUT /datastore/label`` hands the upload straight to ``datastore.save_label``,
which copies it over the existing label with ``shutil.copy``: a label of the wrong shape, a
corrupt upload, or a crash mid-copy would replace a good label. Here the upload is checked
first (readable, integer, on the image's grid) and then written to a temp file and renamed, so a
rejected or interrupted save leaves the previous label untouched.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, LocalDatastore

from ..atomic import atomic_write
from ..errors import InputError
from ..volume import load_image, load_label

logger = logging.getLogger(__name__)


class ValidatingLocalDatastore(LocalDatastore):
    """LocalDatastore whose ``save_label`` rejects bad labels with HTTP 4xx and never half-writes."""

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
        image_uri = self.get_image_uri(image_id)
        if not image_uri:
            raise HTTPException(status_code=404, detail=f"unknown image id {image_id!r}: no such image in the datastore")
        try:
            img = load_image(image_uri)
            load_label(label_filename, like=img)
        except InputError as e:
            # name the upload by what the client sent, not our temp path
            raise HTTPException(status_code=422, detail=f"label for {image_id!r} rejected: {e.problem}") from e
        return self._save_label_atomic(image_id, label_filename, label_tag, label_info)

    def _save_label_atomic(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
        """LocalDatastore.save_label, but temp file + rename instead of copying over the label."""
        obj = self._datastore.objects.get(image_id)
        _, label_ext = self._to_id(os.path.basename(label_filename))
        label_path = self._datastore.label_path(label_tag)
        dest = os.path.join(label_path, self._filename(image_id, label_ext))
        with FileLock(self._lock_file):
            # no image extension on the temp name, so the datastore watcher ignores it
            with atomic_write(dest, suffix=".partial") as out, open(label_filename, "rb") as src:
                shutil.copyfileobj(src, out)
            info = dict(label_info or {})
            info["ts"] = int(time.time())
            info["name"] = os.path.basename(dest)
            obj.labels[label_tag] = DataModel(info=info, ext=label_ext)
            self._update_datastore_file(lock=False)
        logger.info("saved label %s (%s) -> %s", image_id, label_tag, dest)
        return image_id
