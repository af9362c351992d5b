"""Integration tests against a real ``monailabel start_server`` running the app (no mocks).

Models have random weights (``random_weights_for_testing``), so masks carry no meaning; what is
tested is the product's contract over HTTP: indexing on every path a label becomes final,
infer outputs, active learning, bad requests, concurrency and scripted labelling.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ragseg.synthetic import make_dataset
from ragseg.volume import file_checksum

from .server_utils import Server

pytestmark = [pytest.mark.server, pytest.mark.slow]

SHAPE = (48, 44, 16)
CONF = {"random_weights_for_testing": "true", "image_size": "128", "labels": "liver=1,spleen=2,kidney=3",
        "reconcile_interval": "0.5"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("srv")
    make_dataset(root / "ds", n_subjects=7, n_labeled=2, shape=SHAPE)
    srv = Server(root / "ds", root / "server.log", CONF).start()
    try:
        yield srv
    finally:
        srv.stop()


def index_state(studies: Path) -> dict[str, tuple[str, set[int]]]:
    """Read the on-disk index directly: image id -> (label checksum, indexed slice numbers)."""
    p = studies / ".ragseg" / "index" / "index.npz"
    if not p.exists():
        return {}
    with np.load(p) as z:
        meta = json.loads(bytes(z["meta"]).decode())
    out: dict[str, tuple[str, set[int]]] = {}
    for r in meta:
        out.setdefault(r["image_id"], (r["label_checksum"], set()))[1].add(r["slice_index"])
    return out


def labeled_slices(path: Path) -> set[int]:
    lab = np.asarray(nib.load(path).dataobj)
    return {int(z) for z in np.nonzero(lab.any(axis=(0, 1)))[0]}


def expected_index(studies: Path) -> dict[str, tuple[str, set[int]]]:
    final = studies / "labels" / "final"
    return {p.name.removesuffix(".nii.gz"): (file_checksum(p), labeled_slices(p))
            for p in final.glob("*.nii.gz")}


def wait_indexed(server: Server, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if index_state(server.studies) == expected_index(server.studies):
            st = server.info()["ragseg"]["reindex"]
            if not st["pending"] and not any(j["state"] == "running" for j in st["recent_jobs"]):
                return
        time.sleep(0.3)
    raise AssertionError(f"index != labels after {timeout}s: {index_state(server.studies)} vs "
                         f"{expected_index(server.studies)}\n{server.tail(40)}")


def label_bytes(subject_seed: int, keep_slices=None) -> bytes:
    from ragseg.synthetic import make_subject

    s = make_subject(subject_seed, shape=SHAPE)
    lab = s.label.copy()
    if keep_slices is not None:
        mask = np.zeros(SHAPE[2], bool)
        mask[list(keep_slices)] = True
        lab[..., ~mask] = 0
    buf = io.BytesIO()
    img = nib.Nifti1Image(lab, s.affine)
    fh = nib.FileHolder(fileobj=buf)
    img.to_file_map({"image": fh, "header": fh})
    return __import__("gzip").compress(buf.getvalue())


def put_label(server: Server, image_id: str, data: bytes, name: str = "label.nii.gz"):
    return server.request("PUT", f"/datastore/label?image={image_id}", fields={"params": "{}"},
                          files={"label": (name, data)})


def infer(server: Server, image_id: str, params: dict | None = None, output: str = "image"):
    return server.request("POST", f"/infer/ragseg?image={image_id}&output={output}",
                          fields={"params": json.dumps(params or {})})


def test_startup_indexes_existing_labels_and_reports_status(server):
    wait_indexed(server)
    info = server.info()
    st = info["ragseg"]
    assert st["usable"] and st["random_weights"] and "RANDOM WEIGHTS" in st["warning"]
    assert st["backend"] == "rag-sam2" and st["image_size"] == 128
    assert info["models"]["ragseg"]["type"] == "segmentation"
    assert info["models"]["ragseg"]["labels"] == {"liver": 1, "spleen": 2, "kidney": 3}
    assert set(info["strategies"]) >= {"diversity", "random", "first"}
    assert set(index_state(server.studies)) == {"subject_00", "subject_01"}


def test_put_label_returns_job_and_index_grows(server):
    wait_indexed(server)
    t0 = time.time()
    status, body, _ = put_label(server, "subject_02", label_bytes(2))
    put_s = time.time() - t0
    assert status == 200, body
    res = json.loads(body)
    assert res["job_id"].startswith("reindex-") and res["indexing"] == "queued"
    assert res["job_url"] == f"/ragseg/jobs/{res['job_id']}"
    wait_indexed(server)
    assert index_state(server.studies)["subject_02"][1] == labeled_slices(
        server.studies / "labels" / "final" / "subject_02.nii.gz")
    assert put_s < 5.0  # returns without doing the indexing itself
    # the job PUT returned can be looked up
    status, body, _ = server.get(res["job_url"])
    assert status == 200, body
    job = json.loads(body)
    assert job["id"] == res["job_id"] and job["image"] == "subject_02" and job["state"] == "done"
    assert job["slices"] == len(labeled_slices(server.studies / "labels" / "final" / "subject_02.nii.gz"))
    status, body, _ = server.get("/ragseg/jobs/reindex-0-0")
    assert status == 404 and "unknown re-index job" in json.loads(body)["detail"]


def test_infer_returns_label_on_the_image_grid(server, tmp_path):
    wait_indexed(server)
    status, body, headers = infer(server, "subject_05", {"k": 2})
    assert status == 200, body
    out = tmp_path / "seg.nii.gz"
    out.write_bytes(body)
    seg, img = nib.load(out), nib.load(server.studies / "subject_05.nii.gz")
    assert seg.shape == img.shape and np.allclose(seg.affine, img.affine)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2, 3}
    # Slicer's request: NRRD, uint8, json params with label names
    status, body, _ = infer(server, "subject_05", {"result_extension": ".nrrd", "result_dtype": "uint8"}, "all")
    assert status == 200
    assert b"label_names" in body and b"NRRD" in body
    # only some slices / an ROI
    status, body, _ = infer(server, "subject_05", {"slice": [7, 8]}, "json")
    res = json.loads(body)
    assert status == 200 and res["slices"] == [7, 8] and res["label_names"]["liver"] == 1
    status, body, _ = infer(server, "subject_05", {"roi": [[5, 30], [5, 30], [6, 9]]}, "image")
    out.write_bytes(body)
    arr = np.asarray(nib.load(out).dataobj)
    assert not arr[:5].any() and not arr[31:].any() and not arr[..., :6].any() and not arr[..., 10:].any()


def test_infer_says_when_a_class_has_no_labeled_slice(server):
    status, body, _ = infer(server, "subject_05", {"labels": ["liver", "9"]}, "json")
    assert status == 200, body
    res = json.loads(body)
    assert res["segmented_labels"] == ["liver"] and res["missing_labels"] == ["label_9"]
    assert any("no labeled slice" in w and "label_9" in w for w in res["warnings"])


def test_intra_volume_supports_and_human_slices_kept(server, tmp_path):
    """Label 3 slices of an image, segment the rest of the same image."""
    status, _, _ = put_label(server, "subject_06", label_bytes(6, keep_slices=[5, 8, 11]))
    assert status == 200
    wait_indexed(server)
    status, body, _ = infer(server, "subject_06", {"k": 3, "labels": ["liver"]}, "json")
    res = json.loads(body)
    assert res["human_slices_kept"] == [5, 8, 11]
    # supports can come from this image's own labeled slices, never from the query slice
    for sid, z in res["supports"]["liver"]:
        assert not (sid == "subject_06" and z not in (5, 8, 11))
    # A structure that only this image carries (value 7 on its liver, slices 5, 8, 11): its only
    # possible supports are the image's own labeled slices. The whole-volume request must use them
    # (each query slice excludes itself only), and a query on labeled slice 8 gets the others.
    from ragseg.synthetic import make_subject

    subj = make_subject(6, shape=SHAPE)
    lab = np.zeros(SHAPE, np.uint8)
    lab[..., [5, 8, 11]] = np.where(subj.label[..., [5, 8, 11]] == 1, 7, 0)
    assert (lab[..., 8] == 7).any()
    buf = io.BytesIO()
    fh = nib.FileHolder(fileobj=buf)
    nib.Nifti1Image(lab, subj.affine).to_file_map({"image": fh, "header": fh})
    assert put_label(server, "subject_06", __import__("gzip").compress(buf.getvalue()))[0] == 200
    wait_indexed(server)
    status, body, _ = infer(server, "subject_06", {"k": 3, "labels": [7]}, "json")
    res = json.loads(body)
    assert status == 200 and res["segmented_labels"] == ["label_7"] and res["missing_labels"] == [], res
    assert res["supports"]["label_7"] and all(sid == "subject_06" for sid, _ in res["supports"]["label_7"])
    status, body, _ = infer(server, "subject_06", {"k": 3, "labels": [7], "slice": [8]}, "json")
    others = [("subject_06", z) for z in (5, 11) if (lab[..., z] == 7).any()]
    assert others and sorted(map(tuple, json.loads(body)["supports"]["label_7"])) == others
    # without same-image supports nothing else carries label 7: reported missing, not segmented
    status, body, _ = infer(server, "subject_06", {"labels": [7], "same_image_supports": False}, "json")
    assert json.loads(body)["missing_labels"] == ["label_7"]
    # the image's liver label back, as the other tests expect
    assert put_label(server, "subject_06", label_bytes(6, keep_slices=[5, 8, 11]))[0] == 200
    wait_indexed(server)


def test_active_learning_suggests_the_most_diverse_image(server):
    """The suggestion equals an independent k-center computation on the same embeddings."""
    from ragseg.embedders import DinoV2Embedder
    from ragseg.pipeline import Preprocess
    from ragseg.volume import load_image

    wait_indexed(server)
    t = time.time()
    status, body, _ = server.request("POST", "/activelearning/diversity", json_body={})
    first_s = time.time() - t
    assert status == 200, body
    assert first_s < 2.0, first_s  # embeddings come from the background warmer, never the request
    # until the warmer has embedded every unlabeled image the answer says it is partial
    end = time.time() + 180
    while json.loads(body).get("partial") and time.time() < end:
        time.sleep(0.5)
        status, body, _ = server.request("POST", "/activelearning/diversity", json_body={})
    res = json.loads(body)
    assert res["partial"] is False, res
    unlabeled = sorted({f"subject_{i:02d}" for i in range(7)} - set(expected_index(server.studies)))
    assert res["id"] in unlabeled and len(res["slices"]) >= 1 and 0 <= res["coverage"] <= 1
    emb = DinoV2Embedder.random(seed=0, image_size=112)  # what random_weights_for_testing builds
    pre = Preprocess()
    with np.load(server.studies / ".ragseg" / "index" / "index.npz") as z:
        pool = np.array(z["vectors"])
    best = (-1.0, None, None)
    for iid in unlabeled:
        v = emb.embed(pre.slices(load_image(server.studies / f"{iid}.nii.gz")))
        d = 1 - (v @ pool.T).max(1)
        if d.max() > best[0]:
            best = (float(d.max()), iid, int(d.argmax()))
    assert res["id"] == best[1] and res["slices"][0] == best[2]
    assert abs(res["score"] - best[0]) < 1e-4
    # stored in the image info for clients and the infer task
    status, body, _ = server.get(f"/datastore/image/info?image={res['id']}")
    assert status == 200 and json.loads(body)["ragseg_suggestion"]["id"] == res["id"]
    status, body, _ = infer(server, res["id"], {"slice": res["slices"][:1]}, "json")
    assert status == 200 and json.loads(body)["suggestion"]["slices"] == res["slices"]


def test_dropped_label_file_is_indexed(server):
    wait_indexed(server)
    dest = server.studies / "labels" / "final" / "subject_03.nii.gz"
    tmp = dest.with_name(".drop.partial")
    tmp.write_bytes(label_bytes(3))
    os.replace(tmp, dest)  # as a tool that writes atomically would
    wait_indexed(server)
    assert "subject_03" in index_state(server.studies)


def test_resave_replaces_stale_vectors(server):
    wait_indexed(server)
    status, _, _ = put_label(server, "subject_02", label_bytes(2, keep_slices=[4, 9]))
    assert status == 200
    wait_indexed(server)
    cs, slices = index_state(server.studies)["subject_02"]
    assert slices == {4, 9}
    assert cs == file_checksum(server.studies / "labels" / "final" / "subject_02.nii.gz")


def test_bad_requests_are_4xx_and_change_nothing(server):
    wait_indexed(server)
    final = server.studies / "labels" / "final" / "subject_00.nii.gz"
    before_label, before_index = final.read_bytes(), index_state(server.studies)
    wrong = nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4))
    buf = io.BytesIO()
    fh = nib.FileHolder(fileobj=buf)
    wrong.to_file_map({"image": fh, "header": fh})
    cases = [
        (infer(server, "no_such_image", {}, "json"), 404, "unknown image id"),
        (put_label(server, "no_such_image", label_bytes(0)), 404, "unknown image id"),
        (put_label(server, "subject_00", __import__("gzip").compress(buf.getvalue())), 422, "differs from image shape"),
        (put_label(server, "subject_00", b"\x1f\x8b garbage"), 422, "rejected"),
        (server.request("POST", "/infer/no_such_model?image=subject_05", fields={"params": "{}"}), 404, "unknown model"),
        (infer(server, "subject_05", {"k": 0}, "json"), 422, "param k"),
        (infer(server, "subject_05", {"k": 17}, "json"), 422, "param k"),
        (infer(server, "subject_05", {"result_extension": ".png"}, "json"), 422, "result_extension"),
        (infer(server, "subject_05", {"slice": [999]}, "json"), 422, "param slice"),
    ]
    for (status, body, _), want_status, needle in cases:
        assert status == want_status, (status, body)
        assert needle in json.loads(body)["detail"], body
    time.sleep(1.5)  # let a (wrong) re-index happen if one were triggered
    assert final.read_bytes() == before_label
    assert index_state(server.studies) == before_index
    assert not [p for p in final.parent.iterdir() if p.name.startswith(".")]  # no temp debris


def test_concurrent_saves_and_infers(server):
    """20 label saves and infers interleaved from threads; afterwards index == labels exactly, and
    /info answered in < 0.5 s throughout (no request waits on another's model work)."""
    wait_indexed(server)
    errors: list[str] = []
    info_latency: list[float] = []
    stop = threading.Event()

    def poll_info():
        while not stop.is_set():
            t = time.time()
            status, _, _ = server.get("/info/", timeout=120)
            info_latency.append(time.time() - t)
            if status != 200:
                errors.append(f"/info {status}")
            time.sleep(0.2)

    ops = []
    for i in range(10):
        subj = [2, 3, 4, 6][i % 4]
        keep = sorted({(i + j * 3) % SHAPE[2] for j in range(4)})
        ops.append(("save", f"subject_{subj:02d}", label_bytes(subj, keep_slices=keep)))
        ops.append(("infer", f"subject_0{5 if i % 2 else 1}", None))

    def worker(chunk):
        for kind, iid, data in chunk:
            if kind == "save":
                status, body, _ = put_label(server, iid, data)
            else:
                status, body, _ = infer(server, iid, {"k": 2}, "json")
            if status != 200:
                errors.append(f"{kind} {iid}: {status} {body[:200]!r}")

    poller = threading.Thread(target=poll_info)
    poller.start()
    threads = [threading.Thread(target=worker, args=(ops[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    # the re-indexing of the last saves runs now: /info must keep answering
    t_saves = time.time()
    wait_indexed(server, timeout=180)
    stop.set()
    poller.join()
    assert not errors, errors
    assert index_state(server.studies) == expected_index(server.studies)
    assert len(info_latency) > 3
    print(f"/info during the run: max {max(info_latency):.2f}s, median {np.median(info_latency):.2f}s; "
          f"indexing settled {time.time() - t_saves:.1f}s after the last request")
    # infers and saves run on worker threads: the event loop keeps answering
    assert max(info_latency) < 0.5, sorted(info_latency)[-5:]

    # re-indexing alone (no infer holding MONAI Label's event loop): /info stays fast
    for i, subj in enumerate((2, 3, 4, 6)):
        assert put_label(server, f"subject_{subj:02d}", label_bytes(subj, keep_slices=range(i, 16, 2)))[0] == 200
    busy_latency = []
    while True:
        t = time.time()
        st = server.info()["ragseg"]["reindex"]
        busy_latency.append(time.time() - t)
        if not st["pending"] and not any(j["state"] == "running" for j in st["recent_jobs"]):
            break
    wait_indexed(server)
    print(f"/info while re-indexing: {len(busy_latency)} calls, max {max(busy_latency):.3f}s")
    assert max(busy_latency) < 2.0


def test_label_all_via_batch_endpoint(server):
    """POST /batch/infer runs in MONAI Label's subprocess (its own app instance, shared index)."""
    wait_indexed(server)
    final_before = {p.name: p.read_bytes() for p in (server.studies / "labels" / "final").glob("*.nii.gz")}
    orig = server.studies / "labels" / "original"
    unlabeled = {f"subject_{i:02d}" for i in range(7)} - {n.removesuffix(".nii.gz") for n in final_before}
    cmd = [sys.executable, "-m", "ragseg.cli", "label-all", server.url, "--batch", "-k", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr + server.tail(40)
    assert f"labelled {len(unlabeled)}" in r.stdout
    assert {q.name.removesuffix(".nii.gz") for q in orig.glob("*.nii.gz")} == unlabeled
    for q in orig.glob("*.nii.gz"):
        assert nib.load(q).shape == SHAPE
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert f"labelled 0, skipped {len(unlabeled)} already done" in r.stdout
    assert {q.name: q.read_bytes() for q in (server.studies / "labels" / "final").glob("*.nii.gz")} == final_before
    for iid in unlabeled:  # clean up through the API for the next test
        assert server.request("DELETE", f"/datastore/label?id={iid}&tag=original")[0] == 200
    end = time.time() + 30
    while time.time() < end and list(orig.glob("*.nii.gz")):
        time.sleep(0.2)
    assert not list(orig.glob("*.nii.gz"))


def test_label_all_via_server_interrupted_and_resumed(server):
    wait_indexed(server)
    final_before = {p.name: p.read_bytes() for p in (server.studies / "labels" / "final").glob("*.nii.gz")}
    orig = server.studies / "labels" / "original"
    cmd = [sys.executable, "-m", "ragseg.cli", "label-all", server.url, "-k", "2"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.time() + 300
    while time.time() < end and not list(orig.glob("*.nii.gz")):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    p.wait(timeout=120)
    # the server finishes the request it was serving when the client went away: wait until quiet
    first: dict = {}
    while True:
        time.sleep(3)
        now = {q.name: q.stat().st_mtime_ns for q in orig.glob("*.nii.gz")}
        if now == first:
            break
        first = now
    assert first, "nothing was labelled before the interrupt"
    unlabeled = {f"subject_{i:02d}" for i in range(7)} - {n.removesuffix(".nii.gz") for n in final_before}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"skipped {len(first)} already done" in r.stdout
    assert {q.name.removesuffix(".nii.gz") for q in orig.glob("*.nii.gz")} == unlabeled
    for name, mtime in first.items():  # resumed, not redone
        assert (orig / name).stat().st_mtime_ns == mtime
    assert {q.name: q.read_bytes() for q in (server.studies / "labels" / "final").glob("*.nii.gz")} == final_before


def test_missing_weights_reported_not_replaced_by_random(tmp_path):
    """rag-sam2 without weights: the server starts, /info and infer name the missing files and the fetch command."""
    make_dataset(tmp_path / "ds", n_subjects=3, n_labeled=1, shape=SHAPE)
    # explicit backend and retrieval: `auto` would serve with LiteMedSAM (tests/test_server_litemedsam.py)
    srv = Server(tmp_path / "ds", tmp_path / "server.log", {"labels": "liver=1", "backend": "rag-sam2",
                                                            "retrieval": "dinov2"},
                 env={"RAGSEG_WEIGHTS_DIR": str(tmp_path / "weights")}).start()
    try:
        st = srv.wait_for(lambda i: len(i["ragseg"]["reasons"]) == 2, timeout=60)["ragseg"]
        assert not st["usable"] and not st["random_weights"]
        assert "ragseg weights fetch sam2.1-hiera-tiny" in st["reasons"]["engine"]
        assert str(tmp_path / "weights" / "dinov2-small" / "model.safetensors") in st["reasons"]["embedder"]
        status, body, _ = infer(srv, "subject_02", {}, "json")
        detail = json.loads(body)["detail"]
        assert status == 503 and "ragseg weights fetch dinov2-small" in detail and "sam2.1_hiera_tiny.pt" in detail
    finally:
        srv.stop()


def test_bad_conf_stops_the_server_naming_the_key(tmp_path):
    make_dataset(tmp_path / "ds", n_subjects=1, n_labeled=0, shape=SHAPE)
    srv = Server(tmp_path / "ds", tmp_path / "server.log", {"k": "99"})
    with pytest.raises(RuntimeError) as ei:
        srv.start(timeout=90)
    srv.stop()
    assert "--conf k: must be between 1 and 16, got 99" in str(ei.value) + srv.tail(200)


def test_weights_in_place_give_a_segmentation(tmp_path):
    """The user-facing path (no random flag): official-format files at explicit paths load and serve.

    The files hold random weights (no official weights can be fetched here) in the official
    layouts: a SAM 2.1 ``.pt`` with a ``model`` state dict, a DINOv2 ``save_pretrained`` folder.
    """
    import torch
    from transformers import Dinov2Config, Dinov2Model

    from ragseg.sam2_model import build_sam2

    m = build_sam2("hiera_t", image_size=128, random_weights=True, seed=5)
    torch.save({"model": m.state_dict()}, tmp_path / "sam2.1_hiera_tiny.pt")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                             patch_size=14)).save_pretrained(tmp_path / "dino")
    make_dataset(tmp_path / "ds", n_subjects=3, n_labeled=1, shape=SHAPE)
    conf = {"sam2_checkpoint": str(tmp_path / "sam2.1_hiera_tiny.pt"), "dinov2": str(tmp_path / "dino"),
            "image_size": "128", "labels": "liver=1,spleen=2,kidney=3", "reconcile_interval": "0.5"}
    srv = Server(tmp_path / "ds", tmp_path / "server.log", conf,
                 env={"RAGSEG_WEIGHTS_DIR": str(tmp_path / "no-weights")}).start()
    try:
        st = srv.wait_for(lambda i: i["ragseg"]["usable"] and i["ragseg"].get("index", {}).get("images") == 1)["ragseg"]
        assert st["random_weights"] is False and "warning" not in st
        status, body, _ = infer(srv, "subject_02", {"k": 2}, "json")
        res = json.loads(body)
        assert status == 200 and res["segmented_labels"] == ["liver", "spleen", "kidney"]
        assert not any("RANDOM" in w for w in res["warnings"])
    finally:
        srv.stop()
