"""DICOM SEG -> label on the image grid (SEG frames hold only labeled slices)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from ragseg.dicom import write_series
from ragseg.errors import InputError
from ragseg.seg import seg_onto_image_grid
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


@pytest.mark.slow
def test_written_seg_names_and_codes_follow_label_values(tmp_path):
    """Each label value becomes a segment named and SNOMED-coded by its name (value 2 absent here)."""
    import pydicom

    from ragseg.seg import write_seg
    from ragseg.volume import Volume, save_label

    s = make_subject(2, shape=(30, 28, 10))
    lab = s.label.copy()
    lab[lab == 2] = 0  # no spleen
    lab[(lab == 0) & (s.image > 0)] = 0
    lab[:3, :3, 4] = 7  # a structure with a name we have no code for
    write_series(s.image, s.affine, tmp_path / "series")
    save_label(tmp_path / "lab.nii.gz", lab, Volume(s.image, s.affine))
    seg = write_seg(tmp_path / "lab.nii.gz", tmp_path / "series", {1: "liver", 2: "spleen", 3: "kidney", 7: "blob"},
                    tmp_path / "seg.dcm")
    ds = pydicom.dcmread(str(seg))
    got = {str(x.SegmentLabel): (str(x.SegmentedPropertyTypeCodeSequence[0].CodeValue),
                                 str(x.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator),
                                 str(x.SegmentedPropertyCategoryCodeSequence[0].CodeValue))
           for x in ds.SegmentSequence}
    assert set(got) == {"liver", "kidney", "blob"}
    assert got["liver"] == ("10200004", "SCT", "123037004")
    assert got["kidney"] == ("64033007", "SCT", "123037004")
    assert got["blob"][1:] == ("99RAGSEG", "85756007")
    # and it reads back to the same values on the image grid
    back = seg_onto_image_grid(seg, load_image(tmp_path / "series"), {"liver": 1, "spleen": 2, "kidney": 3, "blob": 7})
    img = load_image(tmp_path / "series")
    assert np.array_equal(canonical_slices(back, img.affine), canonical_slices(lab, s.affine))


@pytest.mark.slow
def test_seg_read_by_segment_name_not_number(tmp_path):
    """OHIF numbers segments by sorted name (kidney=1, liver=2, spleen=3): values follow the names."""
    from ragseg.seg import read_seg_labels, write_seg
    from ragseg.volume import Volume, save_label

    s = make_subject(3, shape=(30, 28, 10))
    ohif = np.zeros_like(s.label)
    for ours, theirs in ((1, 2), (2, 3), (3, 1)):
        ohif[s.label == ours] = theirs
    write_series(s.image, s.affine, tmp_path / "series")
    save_label(tmp_path / "ohif.nii.gz", ohif, Volume(s.image, s.affine))
    seg = write_seg(tmp_path / "ohif.nii.gz", tmp_path / "series", {1: "Kidney", 2: "liver", 3: "spleen"},
                    tmp_path / "seg.dcm")
    img = load_image(tmp_path / "series")
    back, new = read_seg_labels(seg, img, {"liver": 1, "spleen": 2, "kidney": 3})
    assert new == {}
    assert np.array_equal(canonical_slices(back, img.affine), canonical_slices(s.label, s.affine))
    # unknown names keep their number when free, else get the next free value, and are reported
    back2, new2 = read_seg_labels(seg, img, {"liver": 3})
    assert new2 == {"Kidney": 1, "spleen": 4}
    assert set(np.unique(back2)) == {0, 1, 3, 4}


def test_instance_order_along_the_normal(tmp_path):
    from ragseg.seg import instances_ascend_along_normal, written_by_dcmjs

    s = make_subject(4, shape=(12, 10, 5))
    write_series(s.image, s.affine, tmp_path / "up")
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1.0, 4
    write_series(s.image[:, :, ::-1], s.affine @ flip, tmp_path / "down")
    assert instances_ascend_along_normal(tmp_path / "up") is True
    assert instances_ascend_along_normal(tmp_path / "down") is False
    assert instances_ascend_along_normal(tmp_path / "nothing") is None
    import pydicom

    ds = pydicom.Dataset()
    assert not written_by_dcmjs(ds)
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions, ds.DeviceSerialNumber = (
        "Unspecified", "Unspecified", "0", "1")
    assert written_by_dcmjs(ds)
