"""DICOM SEG -> label on the image grid (SEG frames hold only labeled slices)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from ragseg.dicom import write_series
from ragseg.errors import InputError
from ragseg.label_app.dicomweb import seg_onto_image_grid
from ragseg.synthetic import make_subject
from ragseg.volume import canonical_slices, load_image


def _seg(tmp_path, series_dir, label, affine):
    from monailabel.datastore.utils.convert import nifti_to_dicom_seg

    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), tmp_path / "lab.nii.gz")
    return nifti_to_dicom_seg(str(series_dir), str(tmp_path / "lab.nii.gz"),
                              [{"name": "liver"}, {"name": "spleen"}, {"name": "kidney"}], use_itk=True)


@pytest.mark.slow
def test_cropped_seg_lands_on_the_image_grid(tmp_path):
    s = make_subject(1, shape=(30, 28, 10))
    lab = s.label.copy()
    lab[..., :3] = 0  # empty slices: the SEG will not carry them
    write_series(s.image, s.affine, tmp_path / "series")
    seg = _seg(tmp_path, tmp_path / "series", lab, s.affine)
    img = load_image(tmp_path / "series")
    out = seg_onto_image_grid(seg, img)
    assert out.shape == img.shape
    assert np.array_equal(canonical_slices(out, img.affine), canonical_slices(lab, s.affine))


@pytest.mark.slow
def test_seg_of_another_geometry_is_rejected(tmp_path):
    s = make_subject(1, shape=(30, 28, 10))
    write_series(s.image, s.affine, tmp_path / "series")
    seg = _seg(tmp_path, tmp_path / "series", s.label, s.affine)
    other = make_subject(1, shape=(30, 28, 10), spacing=(1.0, 1.0, 2.0))
    write_series(other.image, other.affine, tmp_path / "other")
    with pytest.raises(InputError, match="SEG geometry does not match its image series"):
        seg_onto_image_grid(seg, load_image(tmp_path / "other"))
