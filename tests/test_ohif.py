"""OHIF in a real browser against the app on Orthanc: view, auto-segment, save as SEG, re-index.

The whole hospital loop with real components: Orthanc (Debian) holds the series; the MONAI Label
server runs on ``--studies <orthanc>/dicom-web`` with the default LiteMedSAM backend (real
weights); the OHIF viewer bundled with MONAI Label runs in Debian's headless Chromium, driven by
Playwright. Screenshot and timings go to ``test-artifacts/`` (``RAGSEG_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from ragseg.dicom import write_series
from ragseg.label_app.dicomweb import _h as uid_key
from ragseg.seg import write_seg
from ragseg.synthetic import LABEL_NAMES, make_subject
from ragseg.volume import Volume, load_label, save_label

from . import browser_utils
from .integration import needs
from .orthanc_utils import MISSING, Orthanc
from .server_utils import Server

WHY = MISSING or browser_utils.missing()
pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.browser, needs(WHY)]
SHAPE = (96, 96, 8)
NAMES = {v: k for k, v in LABEL_NAMES.items()}  # liver=1, spleen=2, kidney=3

OHIF_STATE = """() => {
  const ss = window.services.segmentationService;
  const seg = ss.getSegmentations()[0];
  const names = {};
  for (const [k, v] of Object.entries(seg ? seg.segments : {})) { if (v) names[k] = v.label; }
  const vol = ss.getLabelmapVolume('1');
  const data = vol ? Array.from(vol.voxelManager.getCompleteScalarDataArray()) : [];
  return {names, data, dims: vol ? Array.from(vol.dimensions) : null,
          origin: vol ? Array.from(vol.origin) : null, direction: vol ? Array.from(vol.direction) : null,
          spacing: vol ? Array.from(vol.spacing) : null};
}"""

# the success toast can come before the labelmap volume exists (seen with the CPU busy): wait for it
LABELMAP_READY = """() => {
  try {
    const ss = window.services.segmentationService;
    return !!(ss.getSegmentations()[0] && ss.getLabelmapVolume('1'));
  } catch (e) { return false; }
}"""

STORE = """() => {
  window.__stored = null; window.__storeError = null;
  const ds = window.extensionManager.getActiveDataSource()[0];
  window.commandsManager.runCommand('storeSegmentation', {segmentationId: '1', dataSource: ds})
    .then(r => { window.__stored = r ? r.SeriesInstanceUID : 'cancelled'; })
    .catch(e => { window.__storeError = String(e); });
}"""


def _wait(pred, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _round_trip(page, srv, tmp_path, study: str, series: str, tag: str) -> tuple[dict, dict, np.ndarray, str]:
    """Open ``study`` in OHIF, auto-segment, check the labelmap, save it as SEG. Returns timings,
    voxels per label, the server's answer (on the image grid) and the stored SEG's series UID."""
    t: dict[str, float] = {}
    t0 = time.time()
    page.goto(f"{srv.url}/ohif/monai-label?StudyInstanceUIDs={study}", wait_until="load", timeout=90_000)
    page.wait_for_function("() => window.services && document.querySelectorAll('canvas').length > 0",
                           timeout=90_000)
    t["open_viewer_s"] = time.time() - t0

    t0 = time.time()
    url_box = page.locator("#monailabelServerURL")
    url_box.fill(srv.url + "/")
    url_box.locator("xpath=ancestor::tr[1]").locator("button").click()  # "connect"
    page.get_by_text("Auto-Segmentation").first.wait_for(timeout=60_000)
    t["connect_panel_s"] = time.time() - t0

    t0 = time.time()
    page.locator("button[title='Run Segmentation']").click()
    page.get_by_text("Running Segmentation - Successful").wait_for(timeout=600_000)
    page.wait_for_function(LABELMAP_READY, timeout=60_000)
    t["auto_segmentation_s"] = time.time() - t0
    state = page.evaluate(OHIF_STATE)
    page.screenshot(path=str(browser_utils.ARTIFACTS / f"ohif_round_trip_{tag}.png"))

    # the labelmap OHIF shows is the server's answer, labels matched by name
    assert sorted(state["names"].values()) == sorted(NAMES), state["names"]
    assert state["dims"] == list(SHAPE), state["dims"]
    buf = np.array(state["data"], dtype=np.uint8)
    assert buf.size == np.prod(SHAPE)
    code, body, _ = srv.request("POST", f"/infer/ragseg?image={series}&output=image", fields={
        "params": json.dumps({"result_extension": ".nrrd", "result_dtype": "uint8",
                              "result_compress": False, "restore_label_idx": False})})
    assert code == 200, body[:300]
    (tmp_path / f"answer_{tag}.nrrd").write_bytes(body)
    answer = load_label(tmp_path / f"answer_{tag}.nrrd")
    shown = np.zeros_like(buf)
    for k, v in state["names"].items():
        shown[buf == int(k)] = NAMES[v]
    raw = answer.array.transpose(2, 1, 0).ravel()  # NRRD voxel order, as the panel copies it
    # and OHIF places that buffer where the answer's header says: buffer voxel (0,0,0) and the
    # axes are the answer's, in LPS (OHIF draws labelmap slice k at this geometry)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ answer.affine
    assert np.allclose(state["origin"], lps[:3, 3], atol=1e-3), (state["origin"], lps[:3, 3])
    assert np.allclose(np.reshape(state["direction"], (3, 3)) * np.array(state["spacing"])[:, None],
                       lps[:3, :3].T, atol=1e-3), (state["direction"], lps[:3, :3])
    assert np.array_equal(shown, raw), "OHIF's labelmap differs from the server's answer"
    per_label = {LABEL_NAMES[v]: int((raw == v).sum()) for v in LABEL_NAMES}
    assert per_label["liver"] > 0 and per_label["spleen"] > 0, per_label

    # save as DICOM SEG to the PACS the way OHIF does (STOW through MONAI Label's proxy)
    t0 = time.time()
    page.evaluate(STORE)
    page.get_by_text("Enter the report name").wait_for(timeout=30_000)
    page.get_by_text("Enter the report name").locator("xpath=following::input[1]").fill(f"ragseg {tag}")
    page.get_by_role("button", name="Save").click()
    page.wait_for_function("() => window.__stored || window.__storeError", timeout=120_000)
    stored, err = page.evaluate("() => [window.__stored, window.__storeError]")
    t["store_seg_s"] = time.time() - t0
    assert err is None and stored not in (None, "cancelled"), err
    return t, per_label, answer.array, stored


def test_ohif_autosegment_save_seg_and_reindex(tmp_path):
    """Both slice orders a PACS holds: InstanceNumber ascending and descending along the normal."""
    from playwright.sync_api import sync_playwright

    pacs = Orthanc(tmp_path / "orthanc").start()
    srv = None
    try:
        series_dirs, subjects = [], []
        for i, order in enumerate(("ascending", "ascending", "descending")):
            s = make_subject(i, shape=SHAPE)
            img, aff = s.image, s.affine
            if order == "descending":  # same anatomy, slices numbered from the top
                flip = np.eye(4)
                flip[2, 2], flip[2, 3] = -1.0, SHAPE[2] - 1
                img, aff = img[:, :, ::-1], aff @ flip
            d = tmp_path / f"series{i}"
            write_series(img, aff, d, patient_id=f"P{i}")
            pacs.stow(sorted(d.glob("*.dcm")))
            series_dirs.append(d)
            subjects.append(s)
        save_label(tmp_path / "l0.nii.gz", subjects[0].label, Volume(subjects[0].image, subjects[0].affine))
        pacs.stow([write_seg(tmp_path / "l0.nii.gz", series_dirs[0], LABEL_NAMES, tmp_path / "l0.dcm")])
        uid = {js["00100020"]["Value"][0]: (js["0020000D"]["Value"][0], js["0020000E"]["Value"][0])
               for js in pacs.series("CT")}
        conf = {"reconcile_interval": "1", "index_dir": str(tmp_path / "ragseg"),
                "labels": ",".join(f"{k}={v}" for k, v in NAMES.items())}
        srv = Server(tmp_path, tmp_path / "server.log", conf,
                     env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "dwcache")})
        srv.start(studies_override=pacs.dicomweb)

        def job_done(image_uid):
            st = json.loads(srv.get("/info/")[1])["ragseg"].get("reindex", {})
            return next((j for j in st.get("recent_jobs", []) if j["image"] == image_uid and j["state"] == "done"),
                        None)

        _wait(lambda: job_done(uid["P0"][1]), 120, "the SEG in the PACS at startup to be indexed")
        browser_utils.ARTIFACTS.mkdir(parents=True, exist_ok=True)
        report = {}
        with sync_playwright() as p:
            ctx = browser_utils.launch(p, tmp_path / "chromium-profile")
            page = ctx.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            for patient, tag in (("P1", "ascending"), ("P2", "descending")):
                study, series = uid[patient]
                timings, per_label, answer, stored = _round_trip(page, srv, tmp_path, study, series, tag)
                # the SEG is discovered in the PACS and indexed, without any PUT /datastore/label
                t0 = time.time()
                job = _wait(lambda series=series: job_done(series), 180, f"the {tag} SEG saved from OHIF to be indexed")
                timings["seg_to_index_s"] = time.time() - t0
                assert job["slices"] == int((answer.reshape(-1, SHAPE[2]) > 0).any(axis=0).sum())
                assert [js for js in pacs.series("SEG") if js["0020000E"]["Value"][0] == stored], "SEG not in Orthanc"
                # what was indexed is the server's answer, voxel for voxel on the image grid, with
                # OHIF's segment numbers (kidney=1, liver=2, spleen=3) mapped back by name
                conv = sorted((tmp_path / "ragseg" / "dicomweb").glob(f"{uid_key(series)}__*.nii.gz"))
                assert len(conv) == 1, conv
                indexed = load_label(conv[0]).array
                assert np.array_equal(indexed, answer), (
                    f"{tag}: the label indexed from OHIF's SEG differs from what OHIF showed "
                    f"(mirrored along the slices: {np.array_equal(indexed[:, :, ::-1], answer)})")
                timings["total_s"] = sum(timings.values())
                report[tag] = {"timings": {k: round(v, 2) for k, v in timings.items()}, "voxels_per_label": per_label,
                               "screenshot": str(browser_utils.ARTIFACTS / f"ohif_round_trip_{tag}.png")}
                print(f"OHIF round trip ({tag}):", report[tag])
            ctx.close()
        assert not [e for e in errors if "WebGL" in e], errors
        (browser_utils.ARTIFACTS / "ohif_round_trip.json").write_text(json.dumps(report, indent=1))
    finally:
        if srv:
            srv.stop()
        pacs.stop()
