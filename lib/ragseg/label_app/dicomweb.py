"""Final labels of a DICOMweb datastore: DICOM SEG series and the image series they reference.

OHIF saves segmentations to the PACS as DICOM SEG; MONAI Label's DICOMweb datastore discovers
them only by searching. ``get_labeled_images`` there returns *image* series ids, while
``get_label_uri`` wants the *SEG* series id, and it caches the converted NIfTI under the image id,
so a newer SEG for the same image would be hidden behind the stale file; and it converts a SEG to
its own (cropped) grid, not the image's, with segment numbers as label values (OHIF numbers
segments by sorted name). This module finds the (image, SEG) pairs itself, keeps the newest SEG
per image, and converts it onto the image grid with values chosen by segment name; and its
datastore writes SEGs with correct segment names and codes (``ragseg.seg``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from monailabel.datastore.dicom import DICOMWebDatastore

from .. import defaults
from ..atomic import atomic_write
from ..errors import InputError
from ..seg import instances_ascend_along_normal, read_seg_labels, write_seg, written_by_dcmjs
from ..volume import load_image, save_label

logger = logging.getLogger(__name__)


def is_dicomweb(datastore) -> bool:
    return isinstance(datastore, DICOMWebDatastore)


def seg_pairs(datastore, meta_cache: dict[str, tuple[str | None, tuple]] | None = None) -> dict[str, str]:
    """image series UID -> newest SEG series UID referencing it (within the datastore's images).

    One SEG search per call. A SEG's metadata (which series it references, its date) is fetched
    once and kept in ``meta_cache`` (SEG UID -> (referenced image UID, sort key)): a stored series
    does not change, and fetching every SEG's metadata on every listing made each re-index O(N).
    """
    from pydicom.dataset import Dataset

    client = datastore._client
    images = set(datastore.list_images())
    cache = meta_cache if meta_cache is not None else {}
    best: dict[str, tuple[tuple, str]] = {}
    for js in client.search_for_series(search_filters={"Modality": "SEG"}):
        seg = Dataset.from_json(js)
        study, seg_uid = str(seg.StudyInstanceUID), str(seg.SeriesInstanceUID)
        if seg_uid not in cache:
            meta = Dataset.from_json(client.retrieve_series_metadata(study, seg_uid)[0])
            ref = meta.get("ReferencedSeriesSequence")
            key = (str(meta.get("SeriesDate", "")), str(meta.get("SeriesTime", "")),
                   int(meta.get("SeriesNumber", 0) or 0), seg_uid)
            cache[seg_uid] = (str(ref[0].SeriesInstanceUID) if ref else None, key)
        image_uid, key = cache[seg_uid]
        if image_uid is None:
            logger.warning("SEG %s references no series; ignored", seg_uid)
            continue
        if image_uid not in images:
            logger.warning("SEG %s references series %s, not in this datastore; ignored", seg_uid, image_uid)
            continue
        if image_uid not in best or key > best[image_uid][0]:
            best[image_uid] = (key, seg_uid)
    return {img: v[1] for img, v in best.items()}


def _h(uid: str) -> str:
    return hashlib.sha1(uid.encode()).hexdigest()[:16]


class DicomwebLabels:
    """(image, label) NIfTI files for a DICOMweb datastore, converted from the newest SEG per image.

    Converted labels are cached as ``<cache>/<h(image UID)>__<h(SEG UID)>_<h(names)>.nii.gz``
    (short hashes: UIDs make file names too long): a new SEG, or new configured names, give a new file
    (so a new checksum and a re-index); an unchanged SEG is never converted twice. Segments whose
    names are not among ``names()`` get new values, remembered in ``<cache>/names.json``.
    """

    def __init__(self, datastore, cache_dir: str | Path, names: Callable[[], dict[str, int]] | None = None,
                 ohif_seg_fix: bool = True):
        self.ds = datastore
        self.cache = Path(cache_dir)
        self.names = names or (lambda: {})
        self.ohif_seg_fix = ohif_seg_fix
        self.rejected: dict[str, str] = {}  # SEG UID -> why
        self.unavailable: set[str] = set()  # image UIDs whose SEG/series could not be fetched last time
        self.seg_meta: dict[str, tuple[str | None, tuple]] = {}  # SEG UID -> (image UID, sort key)

    @property
    def extra_names(self) -> dict[str, int]:
        """Names found in SEGs beyond the configured labels (name -> value)."""
        try:
            return json.loads((self.cache / "names.json").read_text())
        except (OSError, ValueError):
            return {}

    def _all_names(self) -> dict[str, int]:
        names = dict(self.extra_names)
        names.update(self.names())
        return names

    def _remember(self, arr_names: dict[str, int]) -> None:
        extra = self.extra_names
        new = {k: v for k, v in arr_names.items() if k not in extra and k not in self.names()}
        if not new:
            return
        extra.update(new)
        with atomic_write(self.cache / "names.json", "w") as f:
            json.dump(extra, f)

    def _label_file(self, image_uid: str, seg_uid: str, image_path: str) -> Path | None:
        from monailabel.datastore.utils.dicom import dicom_web_download_series

        names = self._all_names()
        # the configured names (and the OHIF fix) decide the values; extra names only grow, never re-map
        how = json.dumps([sorted(self.names().items()), self.ohif_seg_fix])
        out = self.cache / f"{_h(image_uid)}__{_h(seg_uid)}_{_h(how)[:8]}.nii.gz"
        if out.exists():
            return out
        if seg_uid in self.rejected:
            return None
        seg_dir = self.cache / "seg" / _h(seg_uid)
        if not seg_dir.is_dir() or not any(seg_dir.iterdir()):
            self.cache.mkdir(parents=True, exist_ok=True)
            part = Path(tempfile.mkdtemp(dir=self.cache, prefix=".seg-download-"))
            try:  # into a temp folder, then renamed: a download cut off by the PACS leaves nothing
                dicom_web_download_series(None, seg_uid, str(part), self.ds._client, False)
                if not any(part.iterdir()):
                    raise OSError(f"SEG {seg_uid} download returned no files")
                seg_dir.parent.mkdir(parents=True, exist_ok=True)
                if seg_dir.exists():
                    shutil.rmtree(seg_dir)
                os.replace(part, seg_dir)
            finally:
                shutil.rmtree(part, ignore_errors=True)
        files = sorted(p for p in seg_dir.iterdir() if p.is_file())
        img = load_image(image_path)
        try:
            arr, new = read_seg_labels(files[0], img, names)
        except InputError as e:
            self.rejected[seg_uid] = str(e)
            logger.warning("%s", e)
            return None
        self._remember(new)
        if self.ohif_seg_fix and self._mirrored_by_ohif(files[0], image_uid):
            arr = arr[:, :, ::-1]  # the converted series' third axis is the DICOM stacking axis
            logger.info("SEG %s was exported by OHIF for a series numbered along its normal: mirrored "
                        "along the slice axis (--conf ohif_seg_fix false to keep it as stored)", seg_uid)
        for old in self.cache.glob(f"{_h(image_uid)}__*.nii.gz"):  # the replaced SEG's conversion
            old.unlink(missing_ok=True)
        save_label(out, arr, img)
        return out

    def _mirrored_by_ohif(self, seg_file: Path, image_uid: str) -> bool:
        import pydicom

        if not written_by_dcmjs(pydicom.dcmread(str(seg_file), stop_before_pixels=True)):
            return False
        series_dir = Path(self.ds._datastore.image_path()) / image_uid  # MONAI Label's downloaded series
        return instances_ascend_along_normal(series_dir) is True

    def items(self) -> list[tuple[str, str, str]]:
        """[(image id, image NIfTI path, label NIfTI path)] for every image with a usable SEG."""
        out = []
        unavailable = set()
        for image_uid, seg_uid in sorted(seg_pairs(self.ds, self.seg_meta).items()):  # raises when the PACS is down
            try:
                img = self.ds.get_image_uri(image_uid)
                lab = self._label_file(image_uid, seg_uid, img)
            except Exception as e:  # PACS down, conversion failure: retried at the next reconcile
                logger.warning("cannot fetch %s / SEG %s: %s", image_uid, seg_uid, e)
                unavailable.add(image_uid)
                continue
            if lab is not None:
                out.append((image_uid, img, str(lab)))
        self.unavailable = unavailable
        return out

    def label_path(self, image_uid: str) -> str | None:
        hits = sorted(self.cache.glob(f"{_h(image_uid)}__*.nii.gz"))
        return str(hits[-1]) if hits else None


def label_names_by_value(label_info: dict | None, names: dict[str, int]) -> dict[int, str]:
    """value -> name: a client's ``label_info`` ([{"name", "idx"}], as Slicer sends) over ``names``."""
    out = {int(v): str(k) for k, v in names.items()}
    for li in (label_info or {}).get("label_info") or []:
        if isinstance(li, dict) and "name" in li and "idx" in li:
            try:
                out[int(li["idx"])] = str(li["name"])
            except (TypeError, ValueError):
                continue
    return out


def seg_writing(datastore, names: Callable[[], dict[str, int]], *, attempts: int = defaults.PACS_ATTEMPTS,
                retry_wait_s: float = defaults.PACS_RETRY_WAIT_S):
    """Make a MONAI Label DICOMweb datastore write final labels as SEGs with correct names and codes,
    and fail fast when the PACS is down.

    The instance's class is swapped for :class:`SegDicomwebDatastore` rather than building a new
    one, because MONAI Label builds the DICOMweb client and the cache folder (with its file
    watcher) in one place that a subclass cannot reach. The client's retries are set here for the
    same reason: ``attempts`` tries per request, waiting ``retry_wait_s``, then twice that, ...
    (dicomweb-client's own 5 tries from 2 s kept a request 30 s on a PACS that is down).
    """
    if isinstance(datastore, DICOMWebDatastore):
        datastore.__class__ = SegDicomwebDatastore
        datastore.label_names = names
        set_retries(datastore._client, attempts, retry_wait_s)
    return datastore


def set_retries(client, attempts: int, first_wait_s: float) -> None:
    """Tries per DICOMweb request; the waits between them start at ``first_wait_s`` and double."""
    # the `retrying` package dicomweb-client uses waits multiplier * 2**attempt ms after each attempt
    client.set_http_retry_params(retry=attempts > 1, max_attempts=attempts,
                                 wait_exponential_multiplier=max(1, round(first_wait_s * 1000 / 2)))


class SegDicomwebDatastore(DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore with safe downloads and SEGs written by name.

    ``get_image_uri``: the series is downloaded into a temp folder and renamed when complete
    (MONAI Label downloads in place and treats any non-empty folder as done, so a PACS that drops
    mid-series left a partial volume cached for good). ``save_label``: validate, write a SEG
    named and coded by value, STOW it.
    """

    label_names: Callable[[], dict[str, int]] = staticmethod(lambda: {})

    def get_image_uri(self, image_id: str) -> str:
        from monailabel.datastore.utils.dicom import dicom_web_download_series

        root = self._datastore.image_path()
        image_dir = os.path.realpath(os.path.join(root, image_id))
        if not os.path.isdir(image_dir) or not os.listdir(image_dir):
            part = tempfile.mkdtemp(dir=root, prefix=f".{image_id}.part-")
            try:
                dicom_web_download_series(None, image_id, part, self._client, self._fetch_by_frame)
                if not os.listdir(part):
                    raise OSError(f"series {image_id} download returned no files")
                if os.path.exists(image_dir):
                    shutil.rmtree(image_dir)
                os.replace(part, image_dir)
            finally:
                shutil.rmtree(part, ignore_errors=True)
        return super().get_image_uri(image_id)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict,
                   label_id: str = "") -> str:
        from fastapi import HTTPException
        from monailabel.datastore.local import LocalDatastore
        from monailabel.datastore.utils.convert import binary_to_image
        from monailabel.datastore.utils.dicom import dicom_web_upload_dcm
        from monailabel.interfaces.datastore import DefaultLabelTag

        from ..volume import load_label

        try:
            image_uri = self.get_image_uri(image_id)
        except Exception as e:  # PACS down: nothing is stored anywhere, the client may retry
            raise HTTPException(503, f"cannot fetch series {image_id!r} from the PACS ({type(e).__name__}: {e}); "
                                     "the label was not saved, retry when the PACS is back") from e
        if not image_uri:
            raise HTTPException(404, f"unknown image id {image_id!r}: no such series in the PACS")
        tmp_files = []
        try:
            if "".join(Path(label_filename).suffixes) == ".bin":  # OHIF v2 style raw upload
                label_filename = binary_to_image(image_uri, label_filename)
                tmp_files.append(label_filename)
            try:
                load_label(label_filename, like=load_image(image_uri))
            except InputError as e:
                raise HTTPException(422, f"label for {image_id!r} rejected: {e.problem}") from e
            label_info = dict(label_info or {})
            if label_tag == DefaultLabelTag.FINAL:
                series_dir = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))
                seg_file = Path(tempfile.mkdtemp(prefix="ragseg_seg_")) / "seg.dcm"
                tmp_files.append(str(seg_file))
                try:
                    write_seg(label_filename, series_dir, label_names_by_value(label_info, self.label_names()),
                              seg_file)
                except InputError as e:
                    raise HTTPException(422, f"label for {image_id!r} rejected: {e.problem}") from e
                try:
                    seg_uid = dicom_web_upload_dcm(str(seg_file), self._client)
                except Exception as e:  # PACS down: nothing was stored anywhere, the client may retry
                    raise HTTPException(503, f"could not store the SEG in the PACS ({type(e).__name__}: {e}); "
                                             "the label was not saved, retry when the PACS is back") from e
                info = self.get_image_info(image_id)
                label_info.update({"SeriesInstanceUID": seg_uid, "Modality": info.get("Modality"),
                                   "PatientID": info.get("PatientID"),
                                   "StudyInstanceUID": info.get("StudyInstanceUID")})
            return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
        finally:
            for f in tmp_files:
                Path(f).unlink(missing_ok=True)
