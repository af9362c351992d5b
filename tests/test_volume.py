"""Volumes: loading, orientation, slicing round trips, write-back geometry and bad inputs."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ragseg.errors import InputError
from ragseg.synthetic import make_subject, write_subject
from ragseg.volume import (
    canonical_slices,
    load_image,
    load_label,
    normalize_intensities,
    save_label,
    slices_to_volume,
)

from .integration import needs, shared_missing

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "PSR", "ILA"])
@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_slice_round_trip_is_exact(orientation, axis):
    s = make_subject(3, shape=(20, 18, 10), orientation=orientation)
    sl = canonical_slices(s.label, s.affine, axis)
    back = slices_to_volume(sl, s.affine, axis)
    assert back.shape == s.label.shape
    assert np.array_equal(back, s.label)


def test_axial_means_superior_axis_for_any_storage_order():
    """The same anatomy stored RAS or PSR gives identical axial slices."""
    a = make_subject(5, shape=(20, 18, 10), orientation="RAS")
    b = make_subject(5, shape=(20, 18, 10), orientation="PSR")
    assert a.label.shape != b.label.shape
    sa = canonical_slices(a.label, a.affine, "axial")
    sb = canonical_slices(b.label, b.affine, "axial")
    assert sa.shape == (10, 20, 18)
    assert np.array_equal(sa, sb)


@pytest.mark.parametrize("orientation", ["RAS", "PSR"])
@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
def test_written_label_has_input_geometry(tmp_path, orientation, ext):
    s = make_subject(1, shape=(24, 20, 8), spacing=(0.8, 1.1, 3.5), orientation=orientation)
    write_subject(s, tmp_path / "img.nii.gz")
    img = load_image(tmp_path / "img.nii.gz")
    out = save_label(tmp_path / f"lab{ext}", s.label, img)
    lab = load_label(out, like=img)
    assert lab.shape == img.shape
    assert np.allclose(lab.affine, img.affine, atol=1e-5)
    assert np.array_equal(lab.array, s.label)


@needs(shared_missing("totalseg-examples/mr.nii.gz", "totalseg-examples/ct.nii.gz"))
@pytest.mark.parametrize("name", ["mr", "ct"])
def test_shared_volume_write_back(tmp_path, name):
    """A real LPS (MR) or RAS (CT) anisotropic volume: slices -> label -> same grid and affine."""
    img = load_image(SHARED / "totalseg-examples" / f"{name}.nii.gz")
    lab = load_label(SHARED / "totalseg-examples" / f"{name}_labels.nii.gz", like=img)
    for axis in ("axial", "coronal"):
        sl = canonical_slices(lab.array, lab.affine, axis)
        vol = slices_to_volume(sl, img.affine, axis)
        out = save_label(tmp_path / f"{name}_{axis}.nii.gz", vol, img)
        back = nib.load(out)
        assert back.shape == img.shape
        assert np.allclose(back.affine, nib.load(img.path).affine, atol=1e-5)
        assert np.array_equal(np.asarray(back.dataobj), lab.array)


def test_ct_window_and_mr_percentiles():
    ct = np.array([-1000, -160, 40, 240, 3000], dtype=np.float32)
    out = normalize_intensities(ct, "CT", "abdomen")  # level 40, width 400
    assert np.allclose(out, [0, 0, 0.5, 1, 1])
    mr = np.concatenate([np.zeros(100), np.linspace(1, 100, 1000)]).astype(np.float32)
    o = normalize_intensities(mr, "MR")
    assert o.min() == 0 and o.max() == 1 and 0.45 < np.median(o[100:]) < 0.55
    assert normalize_intensities(ct, "auto").tolist() == out.tolist()  # -1000 HU -> CT


# -- bad inputs: one exception type, message names the file and the problem ---------------------

def _expect(path, needle, fn=load_image, **kw):
    with pytest.raises(InputError) as ei:
        fn(path, **kw)
    msg = str(ei.value)
    assert str(path) in msg and needle in msg, msg


def test_bad_inputs(tmp_path):
    aff = np.eye(4)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), aff), tmp_path / "4d.nii.gz")
    _expect(tmp_path / "4d.nii.gz", "expected a 3D volume")

    a = np.zeros((4, 4, 4), np.float32)
    a[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(a, aff), tmp_path / "nan.nii.gz")
    _expect(tmp_path / "nan.nii.gz", "NaN")

    (tmp_path / "empty.nii.gz").write_bytes(b"")
    _expect(tmp_path / "empty.nii.gz", "empty")

    (tmp_path / "x.mha").write_bytes(b"abc")
    _expect(tmp_path / "x.mha", "unknown image format")

    (tmp_path / "corrupt.nii.gz").write_bytes(gzip.compress(b"not a nifti header at all" * 3))
    _expect(tmp_path / "corrupt.nii.gz", "cannot read NIfTI")

    _expect(tmp_path / "missing.nii.gz", "does not exist")


def test_label_grid_checks(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "img.nii.gz")
    img = load_image(tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 5), np.uint8), np.eye(4)), tmp_path / "shape.nii.gz")
    _expect(tmp_path / "shape.nii.gz", "differs from image shape", fn=load_label, like=img)
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), shifted), tmp_path / "aff.nii.gz")
    _expect(tmp_path / "aff.nii.gz", "affine differs", fn=load_label, like=img)
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 0.5, np.float32), np.eye(4)), tmp_path / "float.nii.gz")
    _expect(tmp_path / "float.nii.gz", "non-integer", fn=load_label)


def test_save_label_is_atomic_and_checks_shape(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "img.nii.gz")
    img = load_image(tmp_path / "img.nii.gz")
    p = save_label(tmp_path / "lab.nii.gz", np.ones((4, 4, 4), np.uint8), img)
    before = p.read_bytes()
    with pytest.raises(InputError, match="differs from image shape"):
        save_label(p, np.ones((4, 4, 3), np.uint8), img)
    assert p.read_bytes() == before  # nothing lost
    assert sorted(x.name for x in tmp_path.iterdir()) == ["img.nii.gz", "lab.nii.gz"]  # no temp left


@pytest.mark.parametrize("orientation", ["RAS", "LPS"])
def test_dicom_series_reads_like_the_nifti(tmp_path, orientation):
    """A DICOM series written from a volume loads with the same voxels-in-world (via MONAI/ITK)."""
    from ragseg.dicom import write_series

    s = make_subject(4, shape=(20, 16, 6), spacing=(0.9, 1.3, 2.5), orientation=orientation)
    write_series(s.image, s.affine, tmp_path / "series")
    vol = load_image(tmp_path / "series")
    ref_axial = canonical_slices(np.rint(s.image), s.affine, "axial")
    got_axial = canonical_slices(vol.array, vol.affine, "axial")
    assert got_axial.shape == ref_axial.shape
    assert np.array_equal(got_axial, ref_axial)
    # same world position of voxel centres (up to the reader's axis order)
    assert np.allclose(sorted(vol.spacing), sorted((0.9, 1.3, 2.5)), atol=1e-4)
    corner = vol.affine @ np.array([0, 0, 0, 1.0])
    corners_ref = [s.affine @ np.array([*c, 1.0]) for c in np.ndindex(2, 2, 2)
                   for c in [tuple(np.array(c) * (np.array(s.image.shape) - 1))]]
    assert min(np.abs(corner - c).max() for c in corners_ref) < 1e-3
    # a label written on the DICOM grid goes back exactly onto it
    out = save_label(tmp_path / "lab.nii.gz", np.ones(vol.shape, np.uint8), vol)
    assert np.allclose(load_label(out, like=vol).affine, vol.affine)


def test_empty_dicom_folder(tmp_path):
    (tmp_path / "series").mkdir()
    _expect(tmp_path / "series", "DICOM folder is empty")


def test_sweep_partials_removes_only_dead_writers_debris(tmp_path):
    """A writer killed by SIGKILL leaves its temp file; the sweep removes it, never a live one's."""
    import subprocess
    import sys

    from ragseg.atomic import _partial_prefix, atomic_path, sweep_partials

    script = ("import os, sys; sys.path.insert(0, sys.argv[2]); from ragseg.atomic import atomic_path\n"
              "with atomic_path(sys.argv[1], suffix='.nii.gz') as tmp:\n"
              "    open(tmp, 'wb').write(b'half'); os.kill(os.getpid(), 9)\n")
    lib = str(Path(__file__).resolve().parents[1] / "lib")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "a.nii.gz"), lib], timeout=60)
    dead = list(tmp_path.glob(".partial-*"))
    assert len(dead) == 1 and not (tmp_path / "a.nii.gz").exists()  # the killed writer's debris
    with atomic_path(tmp_path / "b.nii.gz", suffix=".nii.gz") as live:  # a write in progress here
        assert Path(live).name.startswith(_partial_prefix())
        assert sweep_partials(tmp_path) == dead
        assert Path(live).exists() and not dead[0].exists()
        Path(live).write_bytes(b"done")
    assert (tmp_path / "b.nii.gz").read_bytes() == b"done"


def test_affine_spacing_that_disagrees_with_pixdim_is_warned_about(tmp_path, caplog):
    """A converter that wrote a unit sform over real pixdim (the shared ACDC sample) turns every
    distance into voxel counts; the loader follows the affine (the NIfTI rule) and says so."""
    import logging

    arr = np.zeros((8, 8, 4), np.float32)
    img = nib.Nifti1Image(arr, np.eye(4))
    img.header.set_zooms((1.5625, 1.5625, 10.0))  # pixdim only; the sform stays the identity
    img.set_qform(None, code=0)
    img.set_sform(np.eye(4), code=2)
    nib.save(img, tmp_path / "odd.nii.gz")
    nib.save(nib.Nifti1Image(arr, np.diag([1.5, 1.5, 3.0, 1.0])), tmp_path / "fine.nii.gz")
    with caplog.at_level(logging.WARNING, logger="ragseg.volume"):
        odd = load_image(tmp_path / "odd.nii.gz")
        load_image(tmp_path / "fine.nii.gz")
    assert np.allclose(np.sqrt((odd.affine[:3, :3] ** 2).sum(0)), 1.0)  # the affine wins
    msgs = [r.getMessage() for r in caplog.records if "pixdim" in r.getMessage()]
    assert len(msgs) == 1 and "odd.nii.gz" in msgs[0] and "10.0" in msgs[0], msgs
