"""A fresh machine: no SAM 2 / DINOv2 weights -> the real server segments with LiteMedSAM and trains its decoder."""

from __future__ import annotations

import json
import time

import nibabel as nib
import numpy as np
import pytest

from ragseg.synthetic import make_dataset

from .server_utils import Server

pytestmark = pytest.mark.slow
SHAPE = (64, 64, 8)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("lite")
    make_dataset(root / "ds", n_subjects=4, n_labeled=2, shape=SHAPE, seed=11)
    srv = Server(root / "ds", root / "server.log", {"labels": "liver=1,spleen=2,kidney=3", "reconcile_interval": "0.5"},
                 env={"RAGSEG_WEIGHTS_DIR": str(root / "no-weights"), "RAGSEG_CACHE_DIR": str(root / "cache")}).start()
    yield srv
    srv.stop()


def _infer(srv: Server, image_id: str, params: dict | None = None) -> tuple[int, bytes]:
    status, body, _ = srv.request("POST", f"/infer/ragseg?image={image_id}&output=image",
                                  fields={"params": json.dumps(params or {})})
    return status, body


def _dice(srv: Server, body: bytes, image_id: str, tmp_path, value: int) -> float:
    out = tmp_path / f"{image_id}.nii.gz"
    out.write_bytes(body)
    pred = np.asarray(nib.load(out).dataobj) == value
    # the synthetic truth is written beside the images only for labeled subjects; rebuild it
    from ragseg.synthetic import make_subject

    gt = make_subject(11 + int(image_id.split("_")[1]), shape=SHAPE).label == value
    return float(2 * (pred & gt).sum() / max(1, pred.sum() + gt.sum()))


def test_default_backend_is_litemedsam_and_segments(server, tmp_path):
    st = server.wait_for(lambda i: i["ragseg"]["usable"] and i["ragseg"].get("index", {}).get("images") == 2,
                         timeout=240)["ragseg"]
    assert st["backend"] == "litemedsam" and "SAM 2 weights not found" in st["backend_reason"]
    assert "ragseg weights fetch sam2.1-hiera-tiny" in st["backend_reason"]
    assert st["retrieval"] == "litemedsam" and "DINOv2 unavailable" in st["retrieval_reason"]
    assert st["mode"] == "training-free prototype boxes" and not st["random_weights"]
    assert st["image_size"] == 256  # the serving model's input size, not SAM 2's 1024
    status, body = _infer(server, "subject_03", {"k": 2})
    assert status == 200, body[:500]
    dice = _dice(server, body, "subject_03", tmp_path, 1)
    print("liver Dice, training-free LiteMedSAM through the server:", round(dice, 3))
    assert dice > 0.6
    status, body, _ = server.request("POST", "/infer/ragseg?image=subject_03&output=json",
                                     fields={"params": json.dumps({"propagate": True})})
    assert status == 422 and "not available with the litemedsam backend" in json.loads(body)["detail"]


def test_train_task_through_the_server(server, tmp_path):
    server.wait_for(lambda i: i["ragseg"]["usable"] and i["ragseg"].get("index", {}).get("images") == 2, timeout=240)
    info = server.info()
    assert "ragseg_decoder" in info["trainers"]
    status, body, _ = server.request("POST", "/train/ragseg_decoder", json_body={"epochs": 2, "max_episodes": 8,
                                                                                 "decoders": 2,
                                                                                 "retrieved_episodes": 0.5,
                                                                                 "augment_copies": 0,
                                                                                 "precision": "float32"})
    assert status == 200, body
    end = time.time() + 600
    seen_running = None
    while time.time() < end:
        status, body, _ = server.get("/train/?check_if_running=false")
        task = json.loads(body)
        ts = server.info().get("train_stats", {}).get("ragseg_decoder", {})
        if ts.get("state") == "running":
            seen_running = ts
        if task.get("status") in ("DONE", "ERROR"):
            break
        time.sleep(1)
    assert task.get("status") == "DONE", (task, server.tail(40))
    ts = server.info()["train_stats"]["ragseg_decoder"]
    assert ts["epoch"] == ts["total_epochs"] == 4 and 0 < ts["best_metric"] <= 1 and ts["total_time"] > 0
    assert ts["state"] == "done"
    man = json.loads((server.studies / ".ragseg" / "decoders" / "ragseg_decoder" / "manifest.json").read_text())
    assert man["epochs"] == 2 and man["averaged_epochs"] == 1  # a 2-epoch run averages its second half
    # the request's training parameters reached the training
    assert man["retrieved_episodes"] == 0.5 and man["augmented_copies"] == 0 and man["precision"] == "float32"
    assert man["training_slices"] == man["slices"]
    assert man["members"] == 2 and len(man["member_metrics"]) == 2  # two fine-tunings, served as their mean
    if seen_running is not None:  # what Slicer polls while it runs: no total_time yet
        assert "total_time" not in seen_running and seen_running["total_epochs"] == 4
    # the next request uses the fine-tuned decoder
    status, body = _infer(server, "subject_02", {"k": 2})
    assert status == 200
    st = server.info()["ragseg"]
    assert st["mode"] == "fine-tuned prototype decoder" and st["decoder"]["labels"] == {"liver": 1, "spleen": 2,
                                                                                         "kidney": 3}
    dice = _dice(server, body, "subject_02", tmp_path, 1)
    print("liver Dice with the decoder trained through /train:", round(dice, 3))
    assert dice > 0.5
