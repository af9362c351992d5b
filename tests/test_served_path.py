"""Label 3 slices of the example CT, segment the rest: through the real server, equal to the harness.

The first promise of the app, on real anatomy (TotalSegmentator's example CT from ../shared/data)
with the default offline backend (LiteMedSAM, real weights). The harness (``ragseg evaluate
--mode intra``) picks the labeled slices; the server gets a label file with exactly those
slices, and its answer, fetched with MONAI Label's own client, must use supports from the same
image and reach the harness's Dice: both run SliceIndex + Segmenter, so they may differ only by
float rounding. Meanwhile another client checks that the server keeps answering.
"""

from __future__ import annotations

import shutil
import threading
import time

import nibabel as nib
import numpy as np
import pytest

from .integration import SHARED_DATA, needs, shared_missing
from .server_utils import Server

pytestmark = [pytest.mark.slow, pytest.mark.server,
              needs(shared_missing("totalseg-examples/ct.nii.gz", "totalseg-examples/ct_labels.nii.gz"))]

CLASSES = {"liver": 5, "spleen": 1, "kidney_right": 2, "kidney_left": 3}
DICE_TOLERANCE = 0.03  # the bound; the two paths are the same code, so this is rounding room


def test_intra_volume_through_the_server_matches_the_harness(tmp_path):
    from monailabel.client import MONAILabelClient

    from ragseg.evaluate import EvalConfig, Harness, _intra_cases, _load_subjects
    from ragseg.volume import load_image, save_label, slices_to_volume

    src = SHARED_DATA / "totalseg-examples"
    cfg = EvalConfig(images=str(src), labels=str(src), out=str(tmp_path / "eval"), classes=CLASSES, mode="intra",
                     ks=[3], seeds=[0], methods=["retrieved"], modality="CT", label_suffix="_labels",
                     subjects=["ct"], figures=False, feature_cache=str(tmp_path / "features"))
    h = Harness(cfg)
    case = _intra_cases(_load_subjects(cfg, h.pre), cfg)[0]
    harness = {r["class"]: r["dice"] for r in h.run([case], progress=False)}
    pool = sorted(z for _, z in case.pool)
    query = case.query_slices

    # the datastore an annotator leaves: the CT, and a label on the pool slices only
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    shutil.copy(src / "ct.nii.gz", studies / "ct.nii.gz")
    img = load_image(studies / "ct.nii.gz")
    part = np.zeros_like(case.query.labels)
    part[pool] = np.where(np.isin(case.query.labels[pool], list(CLASSES.values())), case.query.labels[pool], 0)
    save_label(studies / "labels" / "final" / "ct.nii.gz", slices_to_volume(part, img.affine, h.pre.axis_index), img)

    # The server reads the harness's embedding cache (--conf feature_cache): it encodes nothing the
    # harness has encoded, which also shows both paths feed LiteMedSAM the very same input bytes.
    encoded = sorted((tmp_path / "features").rglob("*.pt"))
    conf = {"labels": ",".join(f"{k}={v}" for k, v in CLASSES.items()), "modality": "CT", "k": "3",
            "reconcile_interval": "1", "feature_cache": str(tmp_path / "features")}
    srv = Server(studies, tmp_path / "server.log", conf,
                 env={"RAGSEG_WEIGHTS_DIR": str(tmp_path / "no-weights"), "RAGSEG_CACHE_DIR": str(tmp_path / "cache")})
    srv.start()
    try:
        srv.wait_for(lambda i: i["ragseg"]["usable"] and i["ragseg"].get("index", {}).get("slices") == len(pool),
                     timeout=300)
        latency: dict[str, list[float]] = {"/info/": [], "/datastore/?output=stats": []}
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                for path, lat in latency.items():
                    t = time.time()
                    assert srv.get(path, timeout=60)[0] == 200
                    lat.append(time.time() - t)
                time.sleep(0.2)

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            t = time.time()
            out_file, res = MONAILabelClient(srv.url, tmpdir=str(tmp_path)).infer("ragseg", "ct", {"k": 3})
            infer_s = time.time() - t
        finally:
            stop.set()
            poller.join()
        features = srv.info()["ragseg"]["feature_cache"]
    finally:
        srv.stop()

    assert res["missing_labels"] == [] and sorted(res["segmented_labels"]) == sorted(CLASSES), res
    for name in CLASSES:  # the image's own labeled slices are the supports (nothing else is labeled)
        sup = res["supports"][name]
        assert len(sup) == 3 and all(s[0] == "ct" and s[1] in pool for s in sup), (name, sup)
    assert sorted(res["human_slices_kept"]) == pool
    print(f"harness encoded {len(encoded)} slices; server feature cache {features}")
    assert features["directory"] == str(tmp_path / "features") and features["hits"] >= len(pool) + len(query)
    assert features["misses"] == 0 and sorted((tmp_path / "features").rglob("*.pt")) == encoded, features
    pred = np.moveaxis(np.asarray(nib.as_closest_canonical(nib.load(out_file)).dataobj), 2, 0)
    served = {}
    for name, v in CLASSES.items():
        p, g = pred[query] == v, case.query.labels[query] == v
        served[name] = float(2 * (p & g).sum() / max(1, p.sum() + g.sum()))
    print(f"intra-volume Dice on {len(query)} unlabeled slices (labeled {pool}): server {served}, "
          f"harness {harness}; infer {infer_s:.1f} s; max latency during it: "
          + ", ".join(f"{k} {max(v):.3f} s" for k, v in latency.items()))
    for name in CLASSES:
        assert abs(served[name] - harness[name]) <= DICE_TOLERANCE, (name, served[name], harness[name])
    assert np.mean(list(served.values())) > 0.7  # real segmentations, not just equal numbers
    for path, lat in latency.items():
        assert len(lat) >= 3 and max(lat) < 0.5, (path, sorted(lat)[-3:])
