"""Final labels of a DICOMweb datastore: DICOM SEG series and the image series they reference.

OHIF saves segmentations to the PACS as DICOM SEG; MONAI Label's DICOMweb datastore discovers
them only by searching. ``get_labeled_images`` there returns *image* series ids, while
``get_label_uri`` wants the *SEG* series id, and it caches the converted NIfTI under the image id,
so a newer SEG for the same image would be hidden behind the stale file; and it converts a SEG to
its own (cropped) grid, not the image's. This module finds the (image, SEG) pairs itself, keeps
the newest SEG per image, and converts it onto the image grid.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..volume import Volume, load_image, save_label

logger = logging.getLogger(__name__)


def is_dicomweb(datastore) -> bool:
    from monailabel.datastore.dicom import DICOMWebDatastore

    return isinstance(datastore, DICOMWebDatastore)


def seg_pairs(datastore) -> dict[str, str]:
    """image series UID -> newest SEG series UID referencing it (within the datastore's images)."""
    from pydicom.dataset import Dataset

    client = datastore._client
    images = set(datastore.list_images())
    best: dict[str, tuple[tuple, str]] = {}
    for js in client.search_for_series(search_filters={"Modality": "SEG"}):
        seg = Dataset.from_json(js)
        study, seg_uid = str(seg.StudyInstanceUID), str(seg.SeriesInstanceUID)
        meta = Dataset.from_json(client.retrieve_series_metadata(study, seg_uid)[0])
        ref = meta.get("ReferencedSeriesSequence")
        if not ref:
            logger.warning("SEG %s references no series; ignored", seg_uid)
            continue
        image_uid = str(ref[0].SeriesInstanceUID)
        if image_uid not in images:
            logger.warning("SEG %s references series %s, not in this datastore; ignored", seg_uid, image_uid)
            continue
        key = (str(meta.get("SeriesDate", "")), str(meta.get("SeriesTime", "")), int(meta.get("SeriesNumber", 0) or 0),
               seg_uid)
        if image_uid not in best or key > best[image_uid][0]:
            best[image_uid] = (key, seg_uid)
    return {img: v[1] for img, v in best.items()}


def _h(uid: str) -> str:
    return hashlib.sha1(uid.encode()).hexdigest()[:16]


def seg_onto_image_grid(seg_file: str | Path, image: Volume) -> np.ndarray:
    """A DICOM SEG as a label array on ``image``'s grid.

    SEG writers store only the frames that hold a segment, so the SEG's own grid is usually a
    slab of the image's. It is placed back by its affine; a SEG whose grid is not an integer
    sub-grid of the image (other spacing, orientation, or off-grid) is rejected.
    """
    import pydicom
    import pydicom_seg
    import SimpleITK as sitk

    try:
        res = pydicom_seg.MultiClassReader().read(pydicom.dcmread(str(seg_file)))
    except Exception as e:
        raise InputError(seg_file, f"not a readable DICOM SEG ({type(e).__name__}: {e})") from e
    img = res.image  # SimpleITK, LPS
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # -> i, j, k
    d = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())[None, :]
    aff = np.eye(4)
    aff[:3, :3], aff[:3, 3] = d, np.array(img.GetOrigin())
    aff = np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff  # LPS -> RAS
    m = np.linalg.inv(image.affine) @ aff  # SEG voxel -> image voxel
    off = m[:3, 3]
    if not (np.allclose(m[:3, :3], np.eye(3), atol=1e-3) and np.allclose(off, np.round(off), atol=1e-2)):
        raise InputError(seg_file, "SEG geometry does not match its image series (spacing, orientation or "
                                   "position differ); rejected")
    o = np.round(off).astype(int)
    if (o < 0).any() or (o + np.array(arr.shape) > np.array(image.shape)).any():
        raise InputError(seg_file, f"SEG extends outside its image series (offset {o.tolist()}, "
                                   f"SEG {arr.shape}, image {image.shape}); rejected")
    out = np.zeros(image.shape, dtype=np.uint8 if arr.max() < 256 else np.uint16)
    out[o[0]:o[0] + arr.shape[0], o[1]:o[1] + arr.shape[1], o[2]:o[2] + arr.shape[2]] = arr
    return out


class DicomwebLabels:
    """(image, label) NIfTI files for a DICOMweb datastore, converted from the newest SEG per image.

    Converted labels are cached as ``<cache>/<h(image UID)>__<h(SEG UID)>.nii.gz`` (short hashes:
    UIDs make file names too long): a new SEG gives a new file (so a new checksum and a re-index);
    an unchanged SEG is never converted twice.
    """

    def __init__(self, datastore, cache_dir: str | Path):
        self.ds = datastore
        self.cache = Path(cache_dir)
        self.rejected: dict[str, str] = {}  # SEG UID -> why

    def _label_file(self, image_uid: str, seg_uid: str, image_path: str) -> Path | None:
        from monailabel.datastore.utils.dicom import dicom_web_download_series

        out = self.cache / f"{_h(image_uid)}__{_h(seg_uid)}.nii.gz"
        if out.exists():
            return out
        if seg_uid in self.rejected:
            return None
        seg_dir = self.cache / "seg" / _h(seg_uid)
        if not seg_dir.is_dir() or not any(seg_dir.iterdir()):
            dicom_web_download_series(None, seg_uid, str(seg_dir), self.ds._client, False)
        files = sorted(p for p in seg_dir.iterdir() if p.is_file())
        img = load_image(image_path)
        try:
            arr = seg_onto_image_grid(files[0], img)
        except InputError as e:
            self.rejected[seg_uid] = str(e)
            logger.warning("%s", e)
            return None
        for old in self.cache.glob(f"{_h(image_uid)}__*.nii.gz"):  # the replaced SEG's conversion
            old.unlink(missing_ok=True)
        save_label(out, arr, img)
        return out

    def items(self) -> list[tuple[str, str, str]]:
        """[(image id, image NIfTI path, label NIfTI path)] for every image with a usable SEG."""
        out = []
        for image_uid, seg_uid in sorted(seg_pairs(self.ds).items()):
            try:
                img = self.ds.get_image_uri(image_uid)
                lab = self._label_file(image_uid, seg_uid, img)
            except Exception as e:  # PACS down, conversion failure: retried at the next reconcile
                logger.warning("cannot fetch %s / SEG %s: %s", image_uid, seg_uid, e)
                continue
            if lab is not None:
                out.append((image_uid, img, str(lab)))
        return out

    def label_path(self, image_uid: str) -> str | None:
        hits = sorted(self.cache.glob(f"{_h(image_uid)}__*.nii.gz"))
        return str(hits[-1]) if hits else None
