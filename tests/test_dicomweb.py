"""DICOMweb datastore against a real Orthanc: SEGs that appear in the PACS are indexed (no PUT)."""

from __future__ import annotations

import json
import time

import nibabel as nib
import numpy as np
import pytest

from ragseg.dicom import write_series
from ragseg.synthetic import make_subject

from .orthanc_utils import MISSING, Orthanc
from .server_utils import Server

pytestmark = [pytest.mark.server, pytest.mark.slow,
              pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]

SHAPE = (40, 36, 12)


def _seg_for(series_dir, label: np.ndarray, affine, tmp_path, name) -> str:
    from monailabel.datastore.utils.convert import nifti_to_dicom_seg

    lab = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), lab)
    info = [{"name": "liver"}, {"name": "spleen"}, {"name": "kidney"}]
    return nifti_to_dicom_seg(str(series_dir), str(lab), info, use_itk=True)


def _indexed(studies_index) -> dict:
    p = studies_index / "index" / "index.npz"
    if not p.exists():
        return {}
    with np.load(p) as z:
        meta = json.loads(bytes(z["meta"]).decode())
    out: dict = {}
    for r in meta:
        out.setdefault(r["image_id"], set()).add(r["slice_index"])
    return out


def test_seg_in_pacs_is_discovered_indexed_and_used(tmp_path):
    pacs = Orthanc(tmp_path / "orthanc").start()
    srv = None
    try:
        subjects, series_dirs = [], []
        for i in range(3):
            s = make_subject(i, shape=SHAPE)
            d = tmp_path / f"series{i}"
            write_series(s.image, s.affine, d, patient_id=f"P{i}")
            pacs.stow(sorted(d.glob("*.dcm")))
            subjects.append(s)
            series_dirs.append(d)
        seg0 = _seg_for(series_dirs[0], subjects[0].label, subjects[0].affine, tmp_path, "l0")
        pacs.stow([seg0])
        uids = {}
        for js in pacs.series("CT"):
            uids[js["00100020"]["Value"][0]] = js["0020000E"]["Value"][0]  # PatientID -> SeriesInstanceUID
        conf = {"random_weights_for_testing": "true", "image_size": "128", "reconcile_interval": "1",
                "index_dir": str(tmp_path / "ragseg"), "labels": "liver=1,spleen=2,kidney=3"}
        srv = Server(tmp_path, tmp_path / "server.log", conf,
                     env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "dwcache")})
        srv.start(studies_override=pacs.dicomweb)
        # the SEG that was in the PACS at startup is indexed
        t0 = time.time()
        while time.time() - t0 < 120 and uids["P0"] not in _indexed(tmp_path / "ragseg"):
            time.sleep(0.5)
        want0 = {int(z) for z in np.nonzero(subjects[0].label.any(axis=(0, 1)))[0]}
        assert _indexed(tmp_path / "ragseg").get(uids["P0"]) == want0, srv.tail(40)
        # a SEG saved to the PACS later (as OHIF does) is discovered and indexed, without any PUT
        lab1 = subjects[1].label.copy()
        lab1[..., :6] = 0
        pacs.stow([_seg_for(series_dirs[1], lab1, subjects[1].affine, tmp_path, "l1")])
        t0 = time.time()
        while time.time() - t0 < 120 and uids["P1"] not in _indexed(tmp_path / "ragseg"):
            time.sleep(0.5)
        indexed_after = time.time() - t0
        want1 = {int(z) for z in np.nonzero(lab1.any(axis=(0, 1)))[0]}
        assert _indexed(tmp_path / "ragseg").get(uids["P1"]) == want1, srv.tail(40)
        print(f"SEG stored in PACS -> indexed in {indexed_after:.1f}s")
        # infer on the third series reads it from the PACS and returns a label on its grid
        status, body, _ = srv.request("POST", f"/infer/ragseg?image={uids['P2']}&output=json",
                                      fields={"params": json.dumps({"k": 2})})
        assert status == 200, body
        res = json.loads(body)
        assert set(res["segmented_labels"]) == {"liver", "spleen", "kidney"}
        assert any(sid == uids["P0"] for sid, _ in res["supports"]["liver"])
    finally:
        if srv:
            srv.stop()
        pacs.stop()
