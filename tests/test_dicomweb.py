"""DICOMweb datastore against a real Orthanc: SEGs that appear in the PACS are indexed (no PUT)."""

from __future__ import annotations

import json
import threading
import time

import nibabel as nib
import numpy as np
import pytest

from ragseg.dicom import write_series
from ragseg.synthetic import make_subject

from .integration import needs
from .orthanc_utils import MISSING, Orthanc
from .server_utils import Server

pytestmark = [pytest.mark.server, pytest.mark.slow, needs(MISSING)]

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
        # infer on the third series reads it from the PACS and returns a label on its grid; meanwhile
        # the event loop keeps serving /info, the datastore and OHIF's DICOM proxy
        answers: list = []
        latency: dict[str, list[float]] = {"/info/": [], "/datastore/?output=stats": [],
                                           "/proxy/dicom/qido/studies": []}

        def infers():
            for k in (2, 1, 3):
                answers.append(srv.request("POST", f"/infer/ragseg?image={uids['P2']}&output=json",
                                           fields={"params": json.dumps({"k": k})}))

        worker = threading.Thread(target=infers)
        worker.start()
        while worker.is_alive():
            for path, lat in latency.items():
                t = time.time()
                assert srv.get(path)[0] == 200, path
                lat.append(time.time() - t)
        worker.join()
        print("max latency during infers:", {k: round(max(v), 3) for k, v in latency.items()})
        for path, lat in latency.items():
            assert lat and max(lat) < 0.5, (path, sorted(lat)[-3:])
        status, body, _ = answers[0]
        assert status == 200, body
        res = json.loads(body)
        assert set(res["segmented_labels"]) == {"liver", "spleen", "kidney"}
        assert any(sid == uids["P0"] for sid, _ in res["supports"]["liver"])
    finally:
        if srv:
            srv.stop()
        pacs.stop()


def test_pacs_outage_fails_clearly_and_loses_nothing(tmp_path):
    """Orthanc stopped: infer and save answer 503 with the reason, the server keeps serving and the
    index keeps its labels; after a restart new SEGs are discovered; a SEG on another grid is
    rejected with a message in /info."""
    pacs = Orthanc(tmp_path / "orthanc").start()
    srv = None
    try:
        subjects, series_dirs = [], []
        for i in range(3):
            s = make_subject(10 + i, shape=SHAPE)
            d = tmp_path / f"series{i}"
            write_series(s.image, s.affine, d, patient_id=f"P{i}")
            pacs.stow(sorted(d.glob("*.dcm")))
            subjects.append(s)
            series_dirs.append(d)
        pacs.stow([_seg_for(series_dirs[0], subjects[0].label, subjects[0].affine, tmp_path, "l0")])
        uids = {js["00100020"]["Value"][0]: js["0020000E"]["Value"][0] for js in pacs.series("CT")}
        conf = {"random_weights_for_testing": "true", "image_size": "128", "reconcile_interval": "1",
                "embed_unlabeled": "false",  # the background warmer would download the never-fetched series
                "index_dir": str(tmp_path / "ragseg"), "labels": "liver=1,spleen=2,kidney=3"}
        srv = Server(tmp_path, tmp_path / "server.log", conf,
                     env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "dwcache")})
        srv.start(studies_override=pacs.dicomweb)
        t0 = time.time()
        while time.time() - t0 < 120 and uids["P0"] not in _indexed(tmp_path / "ragseg"):
            time.sleep(0.5)
        before = _indexed(tmp_path / "ragseg")
        assert uids["P0"] in before, srv.tail(40)

        pacs.stop()
        # infer on a series never fetched: a clear 5xx naming the cause, not a hang or a bare 500
        status, body, _ = srv.request("POST", f"/infer/ragseg?image={uids['P1']}",
                                      fields={"params": json.dumps({"k": 1})}, timeout=120)
        assert status == 503 and b"PACS" in body, (status, body[:300])
        # a save cannot reach the PACS either: 503, and nothing half-stored
        lab = tmp_path / "lab1.nii.gz"
        nib.save(nib.Nifti1Image(subjects[1].label, subjects[1].affine), lab)
        with open(lab, "rb") as fh:
            status, body, _ = srv.request("PUT", f"/datastore/label?image={uids['P1']}",
                                          fields={"params": json.dumps({"label_info": []})},
                                          files={"label": ("lab1.nii.gz", fh.read())}, timeout=120)
        assert status == 503 and b"not saved" in body, (status, body[:300])
        assert not list((tmp_path / "dwcache").rglob(f"{uids['P1']}")), "a partial series was cached"
        time.sleep(4)  # several reconcile rounds with the PACS down
        info = srv.info()
        assert info["ragseg"]["reindex"]["last_error"], info["ragseg"]["reindex"]
        assert _indexed(tmp_path / "ragseg") == before, "labels were dropped from the index during the outage"

        pacs.start()  # same storage, same port
        # a SEG saved while the server was cut off from the PACS is discovered now
        lab1 = subjects[1].label.copy()
        lab1[..., :5] = 0
        pacs.stow([_seg_for(series_dirs[1], lab1, subjects[1].affine, tmp_path, "l1")])
        # and a SEG drawn on another grid (other spacing) than its series is rejected, with a reason
        other = make_subject(12, shape=SHAPE, spacing=(1.0, 1.0, 2.0))
        write_series(other.image, other.affine, tmp_path / "other", patient_id="P2",
                     series_uid=uids["P2"])
        bad = _seg_for(tmp_path / "other", other.label, other.affine, tmp_path, "bad")
        pacs.stow([bad])
        t0 = time.time()
        while time.time() - t0 < 120:
            idx = _indexed(tmp_path / "ragseg")
            rejected = srv.info()["ragseg"]["reindex"].get("rejected_segs", {})
            if uids["P1"] in idx and rejected:
                break
            time.sleep(0.5)
        want1 = {int(z) for z in np.nonzero(lab1.any(axis=(0, 1)))[0]}
        assert idx.get(uids["P1"]) == want1, srv.tail(40)
        assert idx.get(uids["P0"]) == before[uids["P0"]]
        assert uids["P2"] not in idx
        assert any("geometry does not match" in why for why in rejected.values()), rejected
        status, body, _ = srv.request("POST", f"/infer/ragseg?image={uids['P1']}&output=json",
                                      fields={"params": json.dumps({"k": 1})})
        assert status == 200, body[:300]
    finally:
        if srv:
            srv.stop()
        pacs.stop()


def test_seg_metadata_is_fetched_once_per_seg(tmp_path):
    """Listing the SEGs is one search; each SEG's metadata is fetched once, not on every re-index."""
    from dicomweb_client.api import DICOMwebClient
    from monailabel.datastore.dicom import DICOMWebDatastore

    from ragseg.label_app.dicomweb import seg_pairs

    pacs = Orthanc(tmp_path / "orthanc").start()
    try:
        for i in range(2):
            s = make_subject(i, shape=SHAPE)
            d = tmp_path / f"series{i}"
            write_series(s.image, s.affine, d, patient_id=f"P{i}")
            pacs.stow(sorted(d.glob("*.dcm")))
            pacs.stow([_seg_for(d, s.label, s.affine, tmp_path, f"l{i}")])
        client = DICOMwebClient(url=pacs.dicomweb)
        fetched: list[str] = []
        real = client.retrieve_series_metadata

        def counting(study, series, *a, **kw):
            fetched.append(series)
            return real(study, series, *a, **kw)

        client.retrieve_series_metadata = counting
        ds = DICOMWebDatastore(client, {"Modality": "CT"}, cache_path=str(tmp_path / "dwcache"))
        cache: dict = {}
        first = seg_pairs(ds, cache)
        assert len(first) == 2 and len(fetched) == 2
        for _ in range(3):  # later listings (every re-index job, every reconcile) fetch no metadata
            assert seg_pairs(ds, cache) == first
        assert len(fetched) == 2
        # a new SEG is fetched once
        s = make_subject(0, shape=SHAPE)
        lab = s.label.copy()
        lab[..., :4] = 0
        pacs.stow([_seg_for(tmp_path / "series0", lab, s.affine, tmp_path, "l0b")])
        seg_pairs(ds, cache)
        assert len(fetched) == 3
    finally:
        pacs.stop()
