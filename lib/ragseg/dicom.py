"""Write a volume as a DICOM CT/MR image series (one file per slice).

Used to put sample volumes into a PACS (Orthanc) and to test DICOM-series loading. Geometry:
NIfTI affines are RAS, DICOM patient coordinates are LPS; slices are written along the volume's
third voxel axis with ImagePositionPatient/ImageOrientationPatient from the affine, so a reader
reconstructs the same voxel-to-world mapping.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_series(array: np.ndarray, affine: np.ndarray, out_dir: str | Path, *, modality: str = "CT",
                 patient_id: str = "RAGSEG0001", patient_name: str = "Sample^Synthetic",
                 study_uid: str | None = None, series_uid: str | None = None,
                 series_description: str = "ragseg sample") -> list[Path]:
    """Write ``array`` ([i, j, k] voxels with a RAS ``affine``) as ``k`` single-frame DICOM files.

    Intensities are stored as int16 with RescaleSlope 1 / RescaleIntercept 0 (HU for CT).
    Returns the file paths in slice order.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lps = RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)
    col_vec, row_vec, slice_vec = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    sx, sy, sz = (float(np.linalg.norm(v)) for v in (col_vec, row_vec, slice_vec))
    # DICOM rows run along the array's j axis, columns along i: pixel (r, c) = voxel (c, r)
    iop = [*(col_vec / sx), *(row_vec / sy)]
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    now = datetime.datetime(2026, 1, 1, 12, 0, 0)
    data = np.clip(np.rint(array), -32768, 32767).astype(np.int16)
    paths = []
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        p = out / f"slice_{k:04d}.dcm"
        ds = FileDataset(str(p), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.Modality = modality
        ds.PatientID, ds.PatientName = patient_id, patient_name
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, k + 1
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.SeriesDescription = series_description
        ds.ImageOrientationPatient = [round(float(x), 8) for x in iop]
        ds.ImagePositionPatient = [round(float(x), 6) for x in (lps[:3, 3] + k * slice_vec)]
        ds.PixelSpacing = [round(sy, 6), round(sx, 6)]  # row spacing, column spacing
        ds.SliceThickness = round(sz, 6)
        ds.SpacingBetweenSlices = round(sz, 6)
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(data[:, :, k].T).tobytes()
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(str(p), write_like_original=False)
        paths.append(p)
    return paths
