"""Volumes: load images and label maps, cut them into model-ready slices, write labels back.

Data flow: a file (NIfTI, NRRD or a DICOM series folder) becomes a :class:`Volume` holding the
voxel array exactly as stored plus its affine. Before slicing, the array is reoriented to the
closest canonical RAS orientation (a lossless transpose/flip) so that "axial" means the same
thing for every subject and in-plane orientation is consistent across subjects (which matters for
retrieval). Predictions come back as canonical slices and are mapped onto the exact original grid
by the inverse transpose/flip, so a written label has the input's shape and affine.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from . import defaults
from .atomic import atomic_path
from .errors import InputError

logger = logging.getLogger(__name__)

NIFTI_EXTS = (".nii", ".nii.gz")
NRRD_EXTS = (".nrrd", ".seg.nrrd")
IMAGE_EXTS = NIFTI_EXTS + NRRD_EXTS
AFFINE_TOL = 1e-3  # mm; label and image affines must agree to this


def file_checksum(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of the sorted files of a folder (DICOM series)."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class ChecksumCache:
    """:func:`file_checksum` memoised on (size, mtime, inode): re-hash only files that changed."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[tuple, str]] = {}

    def __call__(self, path: str | os.PathLike) -> str:
        st = os.stat(path)
        sig = (st.st_size, st.st_mtime_ns, st.st_ino)
        hit = self._seen.get(str(path))
        if hit and hit[0] == sig:
            return hit[1]
        h = file_checksum(path)
        self._seen[str(path)] = (sig, h)
        return h


def image_id_of(path: str | os.PathLike) -> str:
    """MONAI Label's image id for a file: its name without the (double) extension."""
    name = Path(path).name
    for ext in sorted(IMAGE_EXTS, key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


@dataclass
class Volume:
    """A 3D image or label map as stored on disk.

    Attributes:
        array: voxel array in file order, float32 for images, int for labels.
        affine: 4x4 voxel-to-RAS-world matrix (nibabel convention).
        path: where it came from (for error messages and checksums).
        header: the original NIfTI header when there was one, so written labels keep it.
    """

    array: np.ndarray
    affine: np.ndarray
    path: str = ""
    header: object | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore


def _ext_of(path: Path) -> str:
    name = path.name.lower()
    for ext in sorted(IMAGE_EXTS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def _read_any(path: Path) -> tuple[np.ndarray, np.ndarray, object | None]:
    """Read an image file or DICOM folder -> (array, RAS affine, nifti header or None)."""
    if not path.exists():
        raise InputError(path, "file does not exist")
    if path.is_dir():
        return _read_dicom_series(path)
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty")
    ext = _ext_of(path)
    if ext in NIFTI_EXTS:
        try:
            img = nib.load(str(path))
            arr = np.asanyarray(img.dataobj)
        except Exception as e:  # nibabel raises many types for truncated/corrupt files
            raise InputError(path, f"cannot read NIfTI file ({type(e).__name__}: {e})") from e
        aff = np.asarray(img.affine, dtype=np.float64)
        _warn_spacing_mismatch(path, aff, img.header)
        return arr, aff, img.header
    if ext in NRRD_EXTS:
        return _read_nrrd(path)
    raise InputError(path, f"unknown image format {ext!r}; expected one of {', '.join(IMAGE_EXTS)} "
                           "or a DICOM series folder")


_spacing_warned: set[str] = set()


def _warn_spacing_mismatch(path: Path, affine: np.ndarray, header) -> None:
    """Warn (once per file) when the affine's voxel size differs from the header's pixdim.

    nibabel (like ITK) takes the sform when its code is set, so the affine wins and every distance
    (spacing-aware resampling, HD95) follows it; a converter that wrote a unit sform over
    1.6 x 1.6 x 10 mm pixdim (as in the shared ACDC sample) makes those distances voxel counts.
    """
    try:
        zooms = np.asarray(header.get_zooms()[:3], dtype=np.float64)
    except Exception:  # a header without zooms: nothing to compare
        return
    aff_z = np.sqrt((affine[:3, :3] ** 2).sum(0))
    if zooms.size == 3 and (zooms > 0).all() and not np.allclose(aff_z, zooms, rtol=0.01) \
            and str(path) not in _spacing_warned:
        _spacing_warned.add(str(path))
        logger.warning("%s: voxel size in the affine %s differs from the header's pixdim %s; using the "
                       "affine (the NIfTI sform/qform rule)", path, np.round(aff_z, 4).tolist(),
                       np.round(zooms, 4).tolist())


def _read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray, None]:
    import nrrd

    try:
        arr, hdr = nrrd.read(str(path))
    except Exception as e:
        raise InputError(path, f"cannot read NRRD file ({type(e).__name__}: {e})") from e
    space = str(hdr.get("space", "left-posterior-superior")).lower()
    dirs = hdr.get("space directions")
    origin = hdr.get("space origin")
    if dirs is None or origin is None:
        raise InputError(path, "NRRD file has no 'space directions'/'space origin' (no geometry)")
    dirs = np.array([d for d in dirs if d is not None and not np.all(np.isnan(np.asarray(d, float)))],
                    dtype=np.float64)
    if dirs.shape != (3, 3):
        raise InputError(path, f"NRRD geometry is not 3D (space directions {dirs.shape})")
    aff = np.eye(4)
    aff[:3, :3] = dirs.T
    aff[:3, 3] = np.asarray(origin, dtype=np.float64)
    if space in ("left-posterior-superior", "lps"):
        aff = np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff
    elif space not in ("right-anterior-superior", "ras"):
        raise InputError(path, f"unsupported NRRD space {space!r}")
    return arr, aff, None


def _read_dicom_series(path: Path) -> tuple[np.ndarray, np.ndarray, None]:
    """Read a DICOM series folder through MONAI's ITK reader (RAS affine, x-y-z array order)."""
    if not any(p.is_file() for p in path.iterdir()):
        raise InputError(path, "DICOM folder is empty")
    try:
        from monai.transforms import LoadImage

        img = LoadImage(image_only=True, reader="ITKReader")(str(path))
    except Exception as e:
        raise InputError(path, f"cannot read DICOM series ({type(e).__name__}: {e})") from e
    arr = np.asarray(img)
    aff = np.asarray(img.affine, dtype=np.float64)
    return arr, aff, None


def _squeeze_to_3d(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise InputError(path, f"expected a 3D volume, got shape {tuple(arr.shape)} ({arr.ndim}D); "
                               "split 4D series into 3D volumes first")
    if min(arr.shape) == 0:
        raise InputError(path, f"volume has an empty dimension: shape {tuple(arr.shape)}")
    return arr


def load_image(path: str | os.PathLike) -> Volume:
    """Load a 3D image. Raises :class:`InputError` naming the file for every unusable input."""
    p = Path(path)
    arr, aff, hdr = _read_any(p)
    arr = _squeeze_to_3d(np.asarray(arr), p)
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise InputError(p, f"unsupported voxel type {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        n = int((~np.isfinite(arr)).sum())
        raise InputError(p, f"image contains {n} NaN/Inf voxels")
    if not np.isfinite(aff).all() or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise InputError(p, "image affine is singular or not finite")
    return Volume(arr, aff, str(p), hdr)


def load_label(path: str | os.PathLike, like: Volume | None = None) -> Volume:
    """Load an integer label map; when ``like`` is given, check it lies on the same grid."""
    p = Path(path)
    arr, aff, hdr = _read_any(p)
    arr = _squeeze_to_3d(np.asarray(arr), p)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InputError(p, "label map contains NaN/Inf voxels")
        if not np.all(np.mod(arr, 1) == 0):
            raise InputError(p, "label map has non-integer values (is this an image, not a label?)")
    elif not np.issubdtype(arr.dtype, np.integer) and arr.dtype != bool:
        raise InputError(p, f"unsupported label voxel type {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise InputError(p, f"label map has negative values (min {arr.min()})")
    arr = arr.astype(np.int32 if arr.size and arr.max() > 255 else np.uint8)
    lab = Volume(arr, aff, str(p), hdr)
    if like is not None:
        check_same_grid(lab, like)
    return lab


def check_same_grid(label: Volume, image: Volume) -> None:
    """Raise :class:`InputError` if ``label`` is not on ``image``'s voxel grid."""
    if label.shape != image.shape:
        raise InputError(label.path, f"label shape {label.shape} differs from image shape {image.shape} "
                                     f"({image.path})")
    if not np.allclose(label.affine, image.affine, atol=AFFINE_TOL):
        raise InputError(label.path, f"label affine differs from image affine ({image.path}); "
                                     "the label is not on the image grid")


# --- orientation and slicing -------------------------------------------------------------------


def _ornt(affine: np.ndarray) -> np.ndarray:
    return nib.orientations.io_orientation(affine)


def to_canonical(arr: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Transpose/flip a voxel array into the closest RAS orientation (lossless)."""
    return nib.orientations.apply_orientation(arr, _ornt(affine))


def from_canonical(arr: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_canonical`: back onto the original voxel grid."""
    ornt = _ornt(affine)
    # The canonical array is laid out as RAS; transform that layout back to the file's.
    inv = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), ornt)
    return nib.orientations.apply_orientation(arr, inv)


def resolve_axis(axis: int | str) -> int:
    """Canonical (RAS) axis index for 'axial'/'coronal'/'sagittal' or 0/1/2."""
    if isinstance(axis, str):
        if axis.isdigit():
            axis = int(axis)
        elif axis.lower() in defaults.AXIS_NAMES:
            return defaults.AXIS_NAMES[axis.lower()]
        else:
            raise InputError(None, f"unknown slicing axis {axis!r}; use one of "
                                   f"{', '.join(defaults.AXIS_NAMES)} or 0/1/2")
    if axis not in (0, 1, 2):
        raise InputError(None, f"slicing axis must be 0, 1 or 2, got {axis}")
    return int(axis)


def canonical_slices(arr: np.ndarray, affine: np.ndarray, axis: int | str = defaults.DEFAULT_AXIS) -> np.ndarray:
    """[n_slices, H, W] view of the canonical array cut along ``axis``."""
    ax = resolve_axis(axis)
    return np.moveaxis(to_canonical(arr, affine), ax, 0)


def slices_to_volume(slices: np.ndarray, affine: np.ndarray, axis: int | str = defaults.DEFAULT_AXIS) -> np.ndarray:
    """Inverse of :func:`canonical_slices`: [n, H, W] back to the original voxel grid."""
    ax = resolve_axis(axis)
    return from_canonical(np.moveaxis(slices, 0, ax), affine)


def file_axis_for(affine: np.ndarray, axis: int | str) -> tuple[int, bool]:
    """The stored voxel axis that becomes canonical ``axis``, and whether it is flipped."""
    ax = resolve_axis(axis)
    ornt = _ornt(affine)
    i = int(np.nonzero(ornt[:, 0] == ax)[0][0])
    return i, bool(ornt[i, 1] < 0)


def slice_spacing(affine: np.ndarray, axis: int | str = defaults.DEFAULT_AXIS) -> tuple[float, float, float]:
    """Voxel spacing (mm) of the [n, H, W] array :func:`canonical_slices` returns."""
    ax = resolve_axis(axis)
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
    ornt = _ornt(affine)
    canon = [float(zooms[int(np.nonzero(ornt[:, 0] == c)[0][0])]) for c in range(3)]
    order = [ax] + [c for c in range(3) if c != ax]
    return tuple(canon[c] for c in order)  # type: ignore[return-value]


def file_to_canonical_slice(index: int, shape: tuple[int, ...], affine: np.ndarray, axis: int | str) -> int:
    """Slice number as a viewer shows it (voxel index k of the stored array) -> canonical index."""
    i, flipped = file_axis_for(affine, axis)
    return shape[i] - 1 - index if flipped else index


def canonical_to_file_slice(index: int, shape: tuple[int, ...], affine: np.ndarray, axis: int | str) -> int:
    """Inverse of :func:`file_to_canonical_slice` (the mapping is its own inverse)."""
    return file_to_canonical_slice(index, shape, affine, axis)


# --- intensities ----------------------------------------------------------------------------------


def guess_modality(arr: np.ndarray) -> str:
    """'CT' when the volume holds calibrated Hounsfield units (air near -1000), else 'MR'."""
    lo = float(np.percentile(arr, 1)) if arr.size else 0.0
    return "CT" if lo <= -500.0 else "MR"


def normalize_intensities(arr: np.ndarray, modality: str = "auto",
                          ct_window: str | tuple[float, float] = defaults.DEFAULT_CT_WINDOW) -> np.ndarray:
    """Map intensities to [0, 1] float32: CT by a window preset, MR by percentile clipping.

    The MR percentiles are taken over the whole volume's non-zero voxels, so every slice of a
    volume shares one mapping (slice-wise normalisation would make empty slices look bright).
    """
    mod = guess_modality(arr) if modality == "auto" else modality.upper()
    if mod == "CT":
        if isinstance(ct_window, str):
            if ct_window not in defaults.CT_WINDOWS:
                raise InputError(None, f"unknown CT window {ct_window!r}; presets: {', '.join(defaults.CT_WINDOWS)}")
            level, width = defaults.CT_WINDOWS[ct_window]
        else:
            level, width = ct_window
        lo, hi = level - width / 2.0, level + width / 2.0
    else:
        fg = arr[arr != 0]
        if fg.size == 0:
            return np.zeros_like(arr, dtype=np.float32)
        lo, hi = (float(v) for v in np.percentile(fg, defaults.MR_PERCENTILES))
    if hi <= lo:
        hi = lo + 1.0
    out = (np.clip(arr, lo, hi) - lo) / (hi - lo)
    return out.astype(np.float32, copy=False)


def resize_slices(slices: np.ndarray | torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """[n, H, W] floats -> [n, 1, size, size] (bilinear, antialiased when shrinking)."""
    t = torch.as_tensor(np.ascontiguousarray(slices) if isinstance(slices, np.ndarray) else slices)
    t = t.float().unsqueeze(1)
    out_hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(t.shape[-2:]) == out_hw:
        return t
    shrink = t.shape[-2] > out_hw[0] or t.shape[-1] > out_hw[1]
    return F.interpolate(t, size=out_hw, mode="bilinear", align_corners=False, antialias=shrink)


def to_model_input(slices01: torch.Tensor,
                   mean: tuple[float, ...] = defaults.IMAGENET_MEAN,
                   std: tuple[float, ...] = defaults.IMAGENET_STD) -> torch.Tensor:
    """[n, 1, H, W] in [0, 1] -> [n, 3, H, W] ImageNet-normalised (grey replicated to RGB)."""
    x = slices01.expand(-1, 3, -1, -1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def resize_logits(logits: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """[n, c, h, w] logits -> [n, c, H, W] by bilinear interpolation (as SAM 2 upsamples)."""
    if tuple(logits.shape[-2:]) == tuple(hw):
        return logits
    return F.interpolate(logits, size=hw, mode="bilinear", align_corners=False)


# --- writing ----------------------------------------------------------------------------------


def save_label(path: str | os.PathLike, label: np.ndarray, like: Volume,
               dtype: str | np.dtype = "uint8") -> Path:
    """Write a label map on ``like``'s grid (same shape and affine), atomically.

    The format follows the extension (.nii.gz/.nii or .nrrd). A crash mid-write leaves the old
    file (or none), never a truncated one.
    """
    p = Path(path)
    if tuple(label.shape) != like.shape:
        raise InputError(p, f"label shape {tuple(label.shape)} differs from image shape {like.shape}")
    dt = np.dtype(dtype)
    if label.size and label.max() > np.iinfo(dt).max:
        raise InputError(p, f"label value {label.max()} does not fit {dt}")
    data = label.astype(dt, copy=False)
    ext = _ext_of(p)
    if ext not in NIFTI_EXTS + NRRD_EXTS:
        raise InputError(p, f"cannot write labels as {ext!r}; use .nii.gz, .nii or .nrrd")
    # the temp name keeps the real extension: the writer picks the format by it
    with atomic_path(p, suffix=ext) as tmp:
        if ext in NIFTI_EXTS:
            hdr = like.header.copy() if isinstance(like.header, nib.Nifti1Header) else None
            img = nib.Nifti1Image(data, like.affine, header=hdr)
            img.set_data_dtype(dt)
            img.header.set_slope_inter(1, 0)
            nib.save(img, tmp)
        elif ext in NRRD_EXTS:
            import nrrd

            lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ like.affine
            nrrd.write(tmp, data, header={
                "space": "left-posterior-superior",
                "space directions": lps[:3, :3].T,
                "space origin": lps[:3, 3],
                "kinds": ["domain", "domain", "domain"],
                "encoding": "gzip",
            }, index_order="F")
    return p
