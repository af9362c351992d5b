"""The requests 3D Slicer's MONAI Label module sends, checked against what the module parses.

Slicer cannot run here, so the module's own HTTP client (``monailabel.client.MONAILabelClient``,
which the Slicer module vendors) sends the requests with the fields the module sets: next sample
(``id``, then ``GET /datastore/image``), infer with ``result_extension`` ``.nrrd`` and
``result_dtype`` ``uint8`` (multipart answer: the NRRD + JSON with ``label_names``), ``slice`` and
``roi``, and ``PUT /datastore/label`` with ``label_info`` [{name, idx}]. Responses are read as
the module reads them: the NRRD through its header (geometry), label values through
``label_names``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import nrrd
import numpy as np
import pytest

from ragseg.synthetic import make_dataset
from ragseg.volume import load_image, load_label, save_label

from .server_utils import Server

pytestmark = [pytest.mark.server, pytest.mark.slow]

SHAPE = (40, 36, 14)
CONF = {"random_weights_for_testing": "true", "image_size": "128", "labels": "liver=1,spleen=2,kidney=3",
        "reconcile_interval": "0.5"}
SLICER_INFER = {"result_extension": ".nrrd", "result_dtype": "uint8"}


@pytest.fixture(scope="module")
def slicer(tmp_path_factory):
    from monailabel.client import MONAILabelClient

    root = tmp_path_factory.mktemp("slicer")
    make_dataset(root / "ds", n_subjects=4, n_labeled=2, shape=SHAPE)
    srv = Server(root / "ds", root / "server.log", CONF).start()
    try:
        yield srv, MONAILabelClient(srv.url + "/", tmpdir=str(root / "client")), root
    finally:
        srv.stop()


def _world_equal(img_path: str, result_path: str) -> np.ndarray:
    """The result on the image's voxel grid, checking both describe the same world grid."""
    img, res = load_image(img_path), load_label(result_path)
    assert res.shape == img.shape
    if np.allclose(res.affine, img.affine, atol=1e-4):
        return res.array
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1.0, img.shape[2] - 1
    assert np.allclose(img.affine @ flip, res.affine, atol=1e-4), (img.affine, res.affine)
    return res.array[:, :, ::-1]


def test_info_lists_what_the_module_shows(slicer):
    _, client, _ = slicer
    info = client.info()
    m = info["models"]["ragseg"]
    assert m["type"] == "segmentation" and m["dimension"] == 3  # listed under Auto-segmentation
    assert m["labels"] == {"liver": 1, "spleen": 2, "kidney": 3}
    assert {"diversity", "random", "first"} <= set(info["strategies"])
    assert "ragseg_decoder" in info["trainers"]


def test_next_sample_then_infer_nrrd_then_save_label(slicer):
    srv, client, root = slicer
    sample = client.next_sample("diversity", {})
    image_id = sample["id"]
    assert isinstance(image_id, str) and image_id
    # the module loads sample["path"] when it is local, else downloads the image
    code, body, _ = srv.get(f"/datastore/image?image={image_id}")
    assert code == 200 and len(body) > 1000
    img_path = sample.get("path") or str(root / "ds" / f"{image_id}.nii.gz")
    assert Path(img_path).exists()

    result_file, params = client.infer("ragseg", image_id, dict(SLICER_INFER))
    assert result_file.endswith(".nrrd")
    data, header = nrrd.read(result_file)
    assert data.dtype == np.uint8 and header["space"] == "left-posterior-superior"
    on_grid = _world_equal(img_path, result_file)
    names = params["label_names"]  # the module names segments by this map
    assert names == {"liver": 1, "spleen": 2, "kidney": 3}
    assert set(np.unique(on_grid)) <= {0, *names.values()}

    # one slice only (the module's "current slice" request) and an ROI
    _, p1 = client.infer("ragseg", image_id, dict(SLICER_INFER, slice=5))
    assert p1["slices"] == [5]
    res_file, p2 = client.infer("ragseg", image_id, dict(SLICER_INFER, roi=[[5, 20], [4, 30], [3, 6]]))
    arr = _world_equal(img_path, res_file)
    assert sorted(p2["slices"]) == [3, 4, 5, 6]
    outside = arr.copy()
    outside[5:21, 4:31, 3:7] = 0
    assert not outside.any()

    # save: the module uploads its segmentation as .nrrd with label_info [{name, idx}]
    lab = np.zeros(SHAPE, np.uint8)
    lab[10:20, 10:20, 7] = 1
    lab[22:28, 10:16, 7] = 3
    save_label(root / "slicer_label.nrrd", lab, load_image(img_path))
    resp = client.save_label(image_id, str(root / "slicer_label.nrrd"), params={
        "label_info": [{"name": "liver", "idx": 1}, {"name": "kidney", "idx": 3}]})
    assert resp and resp.get("image") == image_id, resp
    end = time.time() + 60
    while time.time() < end:
        st = srv.info()["ragseg"]["reindex"]
        if any(j["image"] == image_id and j["state"] == "done" for j in st["recent_jobs"]):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"label saved from Slicer not indexed: {st}")
    saved = load_label(next((root / "ds" / "labels" / "final").glob(f"{image_id}.*")))
    assert np.array_equal(saved.array, lab)


def test_bad_slicer_requests_get_clear_4xx(slicer):
    srv, _, _ = slicer
    image_id = json.loads(srv.get("/datastore/?output=all")[1])
    image_id = sorted(image_id["objects"])[0]
    for params, msg in (({"result_extension": ".mha"}, "result_extension"), ({"result_dtype": "float32"}, "result_dtype"),
                        ({"slice": 999}, "outside"), ({"roi": [1, 2, 3]}, "roi")):
        code, body, _ = srv.request("POST", f"/infer/ragseg?image={image_id}", fields={"params": json.dumps(params)})
        assert code == 422 and msg in body.decode(), (params, code, body[:200])
