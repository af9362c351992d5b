"""DICOM SEG <-> label maps, with segments identified by name and coded terms.

A label map says "voxel value 2"; a DICOM SEG says "segment 3, SegmentLabel 'spleen', coded
SCT 78961009". Writers number segments their own way: OHIF numbers them by the sorted label
names (kidney=1, liver=2, spleen=3), while our label values come from ``--conf labels``
(liver=1, spleen=2, kidney=3); dcmqi numbers them 1..n in order. So a SEG is always read by
segment *name*, never by number, and written with each label value's segment named and coded
by that value's name.

MONAI Label's own ``nifti_to_dicom_seg`` names segments by position in ``label_info`` rather than
by value and codes every segment as "Spleen" (SCT 78961009), which is why this module exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError, RagsegError
from .volume import Volume

logger = logging.getLogger(__name__)

SCT = "SCT"
ANATOMY = ("123037004", SCT, "Anatomical Structure")
ALTERED = ("49755003", SCT, "Morphologically Altered Structure")
TISSUE = ("85756007", SCT, "Tissue")
LOCAL_SCHEME = "99RAGSEG"  # DICOM PS3.16 8.2: private coding schemes start with "99"

# name (normalised) -> (category, type); SNOMED CT codes as in DICOM CID 7150/7166/7151.
CODES: dict[str, tuple[tuple[str, str, str], tuple[str, str, str]]] = {
    "liver": (ANATOMY, ("10200004", SCT, "Liver")),
    "spleen": (ANATOMY, ("78961009", SCT, "Spleen")),
    "kidney": (ANATOMY, ("64033007", SCT, "Kidney")),
    "kidney_right": (ANATOMY, ("9846003", SCT, "Right kidney")),
    "kidney_left": (ANATOMY, ("18639004", SCT, "Left kidney")),
    "pancreas": (ANATOMY, ("15776009", SCT, "Pancreas")),
    "gallbladder": (ANATOMY, ("28231008", SCT, "Gallbladder")),
    "stomach": (ANATOMY, ("69695003", SCT, "Stomach")),
    "aorta": (ANATOMY, ("15825003", SCT, "Aorta")),
    "heart": (ANATOMY, ("80891009", SCT, "Heart")),
    "lung": (ANATOMY, ("39607008", SCT, "Lung")),
    "brain": (ANATOMY, ("12738006", SCT, "Brain")),
    "urinary_bladder": (ANATOMY, ("89837001", SCT, "Urinary bladder")),
    "prostate": (ANATOMY, ("41216001", SCT, "Prostate")),
    "esophagus": (ANATOMY, ("32849002", SCT, "Esophagus")),
    "lesion": (ALTERED, ("52988006", SCT, "Lesion")),
    "tumor": (ALTERED, ("108369006", SCT, "Neoplasm")),
}
ALIASES = {"right_kidney": "kidney_right", "left_kidney": "kidney_left", "lesions": "lesion",
           "bladder": "urinary_bladder", "tumour": "tumor", "ms_lesion": "lesion", "gall_bladder": "gallbladder"}


def normalise(name: str) -> str:
    n = "_".join(str(name).strip().lower().replace("-", " ").split())
    return ALIASES.get(n, n)


def codes_for(name: str) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
    """(category, type) codes for a segment name; a local code for names not in :data:`CODES`."""
    n = normalise(name)
    if n in CODES:
        return CODES[n]
    local = "R" + hashlib.sha1(n.encode()).hexdigest()[:8].upper()  # stable, <= 16 chars
    return TISSUE, (local, LOCAL_SCHEME, str(name)[:64])


def _code(c: tuple[str, str, str]) -> dict:
    return {"CodeValue": c[0], "CodingSchemeDesignator": c[1], "CodeMeaning": c[2]}


def segment_attributes(names_by_value: dict[int, str], values: list[int]) -> list[dict]:
    """dcmqi ``segmentAttributes`` for the label ``values`` present (``labelID`` = the voxel value)."""
    out = []
    for v in values:
        name = names_by_value.get(int(v), f"label_{int(v)}")
        cat, typ = codes_for(name)
        rgb = [int(x) for x in np.random.default_rng(int(v)).integers(40, 256, 3)]  # stable per value
        out.append({
            "labelID": int(v), "SegmentLabel": name, "SegmentDescription": name,
            "SegmentAlgorithmType": "SEMIAUTOMATIC", "SegmentAlgorithmName": "ragseg",
            "SegmentedPropertyCategoryCodeSequence": _code(cat), "SegmentedPropertyTypeCodeSequence": _code(typ),
            "recommendedDisplayRGBValue": rgb,
        })
    return out


def _dcmqi(tool: str) -> str:
    exe = shutil.which(tool) or str(Path(sys.executable).parent / tool)
    if not os.path.exists(exe):
        raise RagsegError(f"dcmqi's {tool} is not installed (pip install dcmqi)")
    return exe


def write_seg(label_file: str | Path, series_dir: str | Path, names_by_value: dict[int, str], out_file: str | Path,
              *, series_description: str = "ragseg labels", series_number: int = 300) -> Path:
    """Write the label map ``label_file`` (on the grid of the DICOM series in ``series_dir``) as a SEG.

    Uses dcmqi's ``itkimage2segimage``, as MONAI Label does; every non-zero value becomes a
    segment named from ``names_by_value`` and coded by :func:`codes_for` (dcmqi numbers segments
    1..n, so readers must go by name).
    Raises :class:`InputError` for an empty label map (a SEG needs at least one segment).
    """
    from .volume import load_label

    values = [int(v) for v in np.unique(load_label(label_file).array) if v != 0]
    if not values:
        raise InputError(label_file, "the label is empty: a DICOM SEG needs at least one labeled voxel")
    meta = {
        "ContentCreatorName": "ragseg", "ClinicalTrialSeriesID": "Session1", "ClinicalTrialTimePointID": "1",
        "SeriesDescription": series_description, "SeriesNumber": str(series_number), "InstanceNumber": "1",
        "ContentLabel": "SEGMENTATION", "ContentDescription": "ragseg few-shot labels",
        "ClinicalTrialCoordinatingCenterName": "ragseg", "BodyPartExamined": "",
        "segmentAttributes": [segment_attributes(names_by_value, values)],
    }
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as td:
        mf = Path(td) / "meta.json"
        mf.write_text(json.dumps(meta))
        tmp_out = Path(td) / "seg.dcm"
        r = subprocess.run([_dcmqi("itkimage2segimage"), "--inputImageList", str(label_file), "--inputDICOMDirectory",
                            str(series_dir), "--outputDICOM", str(tmp_out), "--inputMetadata", str(mf)],
                           capture_output=True, text=True)
        if r.returncode != 0 or not tmp_out.exists():
            raise InputError(label_file, f"itkimage2segimage failed: {(r.stderr or r.stdout).strip()[-500:]}")
        shutil.move(str(tmp_out), str(out))
    return out


@dataclass
class SegSegment:
    number: int
    label: str
    category: str
    type: str


def read_segments(ds) -> list[SegSegment]:
    """The segments of a SEG dataset (number, label, category and type code meanings)."""
    out = []
    for s in ds.get("SegmentSequence", []):
        cat = s.get("SegmentedPropertyCategoryCodeSequence")
        typ = s.get("SegmentedPropertyTypeCodeSequence")
        out.append(SegSegment(int(s.SegmentNumber), str(s.get("SegmentLabel", "")),
                              str(cat[0].CodeMeaning) if cat else "", str(typ[0].CodeMeaning) if typ else ""))
    return out


def value_map(segments: list[SegSegment], names: dict[str, int]) -> tuple[dict[int, int], dict[str, int]]:
    """Segment number -> label value, by name (``names``: label name -> value).

    A segment named like a known label gets that label's value, whatever its number. A segment
    with an unknown name keeps its number when no known label uses it, else takes the next free
    value; the second result lists those new names so callers can show them.
    """
    known = {normalise(k): int(v) for k, v in names.items()}
    taken = set(known.values())
    out: dict[int, int] = {}
    new: dict[str, int] = {}
    for s in segments:
        key = normalise(s.label) if s.label else ""
        if key in known:
            out[s.number] = known[key]
            continue
        v = s.number if s.number not in taken else max(taken | {0}) + 1
        taken.add(v)
        out[s.number] = v
        new[s.label or f"segment_{s.number}"] = v
    return out, new


def seg_onto_image_grid(seg_file: str | Path, image: Volume, names: dict[str, int] | None = None) -> np.ndarray:
    """A DICOM SEG as a label array on ``image``'s grid (see :func:`read_seg_labels`)."""
    return read_seg_labels(seg_file, image, names)[0]


def read_seg_labels(seg_file: str | Path, image: Volume,
                    names: dict[str, int] | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """A DICOM SEG as a label array on ``image``'s grid, values chosen by segment name.

    Returns the array and the segment names that were not in ``names`` with the values they got.

    SEG writers store only the frames that hold a segment, so the SEG's own grid is usually a
    slab of the image's. It is placed back by its affine; a SEG whose grid is not an integer
    sub-grid of the image (other spacing, orientation, or off-grid) is rejected. ``names`` maps
    label names to values (see :func:`value_map`); without it segment numbers are kept.
    """
    import pydicom
    import pydicom_seg
    import SimpleITK as sitk

    try:
        ds = pydicom.dcmread(str(seg_file))
        res = pydicom_seg.MultiClassReader().read(ds)
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
    new: dict[str, int] = {}
    if names is not None:
        mapping, new = value_map(read_segments(ds), names)
        if new:
            logger.warning("SEG %s: segments with names not among the labels %s got values %s",
                           Path(seg_file).name, sorted(names), new)
        lut = np.zeros(max([int(arr.max()), *mapping]) + 1, dtype=np.int64)
        for num, v in mapping.items():
            lut[num] = v
        arr = lut[arr]
    out = np.zeros(image.shape, dtype=np.uint8 if arr.max() < 256 else np.uint16)
    out[o[0]:o[0] + arr.shape[0], o[1]:o[1] + arr.shape[1], o[2]:o[2] + arr.shape[2]] = arr
    return out, new


# What dcmjs (OHIF's SEG writer) puts in every SEG it derives; no other writer we know of leaves
# this exact combination of placeholders.
DCMJS_FINGERPRINT = {"Manufacturer": "Unspecified", "ManufacturerModelName": "Unspecified",
                     "SoftwareVersions": "0", "DeviceSerialNumber": "1"}


def written_by_dcmjs(ds) -> bool:
    """True for a SEG exported by OHIF (dcmjs), judged by the placeholders it writes."""
    return all(str(ds.get(k, "")) == v for k, v in DCMJS_FINGERPRINT.items())


def instances_ascend_along_normal(series_dir: str | Path) -> bool | None:
    """Whether InstanceNumber grows along the slice normal (row x column) in a DICOM series folder.

    None when it cannot be told (no files, missing tags, mixed order). The bundled OHIF 3.x writes
    labelmap slice ``k`` (ascending along the normal, as displayed) onto the image that is
    ``K-1-k``-th by InstanceNumber when it exports a SEG; for series whose InstanceNumber ascends
    along the normal that mirrors the SEG along the slice axis (measured in ``tests/test_ohif.py``
    with both orders; cf. OHIF issues #5038, #5183).
    """
    import pydicom

    pos = []
    for f in sorted(Path(series_dir).glob("*")):
        try:
            d = pydicom.dcmread(str(f), stop_before_pixels=True)
            iop = np.asarray(d.ImageOrientationPatient, dtype=float)
            n = np.cross(iop[:3], iop[3:])
            pos.append((int(d.InstanceNumber), float(np.dot(np.asarray(d.ImagePositionPatient, float), n))))
        except Exception:  # not a DICOM image of the series (or missing tags)
            continue
    if len(pos) < 2:
        return None
    z = np.array([p for _, p in sorted(pos)])
    dz = np.diff(z)
    if (dz > 0).all():
        return True
    if (dz < 0).all():
        return False
    return None
