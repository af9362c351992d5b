"""Supports and queries of different in-plane sizes (patients are scanned differently).

Synthetic volumes of three sizes through both backends (random weights) and fine-tuning, and the
ACDC sample (cardiac MRI of 154x224 .. 256x256 pixels) through a real server: index 4 patients,
infer a fifth.
"""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ragseg.synthetic import make_subject, write_subject

from .integration import acdc_slab, needs, shared_missing
from .server_utils import Server

SIZES = [(48, 40, 5), (64, 56, 5), (40, 64, 5)]  # in-plane sizes differ; the query's is new


def _dataset(root):
    for i, shape in enumerate(SIZES):
        s = make_subject(20 + i, shape=shape)
        write_subject(s, root / f"subject_{i}.nii.gz", root / "labels" / f"subject_{i}.nii.gz" if i < 2 else None)
    return make_subject(22, shape=SIZES[2])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["rag-sam2", "litemedsam"])
def test_supports_of_other_sizes_segment_a_query_of_its_own_size(tmp_path, backend):
    from ragseg.factory import ModelConfig, ModelSet
    from ragseg.pipeline import Preprocess, Segmenter, discover_pairs, open_index, sync_index

    query = _dataset(tmp_path)
    models = ModelSet(ModelConfig(backend=backend, retrieval="litemedsam" if backend == "litemedsam" else "dinov2",
                                  image_size=128, random_weights=True))
    emb, eng = models.embedder(), models.engine()
    pre = Preprocess(modality="CT")
    idx = open_index(tmp_path / "index", emb, pre)
    rep = sync_index(idx, emb, pre, discover_pairs(tmp_path, tmp_path / "labels"))
    assert sorted(rep.added) == ["subject_0", "subject_1"]
    res = Segmenter(eng, emb, idx, pre, k=2).segment_volume(tmp_path / "subject_2.nii.gz", labels=[1, 2])
    assert res.label_map.shape == SIZES[2]  # the answer is on the query's own grid
    used = {sid for sups in res.supports.values() for sid, _ in sups}
    assert used == {"subject_0", "subject_1"}, res.supports  # both sizes were supports
    assert res.missing_labels == [] and query.label.shape == res.label_map.shape


@pytest.mark.slow
def test_training_set_from_slices_of_several_sizes_keeps_order():
    """build_training_set on a mixed list == the same slices encoded size by size."""
    import torch

    from ragseg.fewshot import LiteMedSamAdapter, build_training_set
    from ragseg.litemedsam import LiteMedSAM
    from ragseg.pipeline import Preprocess
    from ragseg.volume import Volume

    pre = Preprocess(modality="CT")
    sl, lb = [], []
    for i, shape in enumerate(SIZES[:2]):
        s = make_subject(30 + i, shape=shape)
        x, y = pre.slices(Volume(s.image, s.affine)), pre.label_slices(Volume(s.label, s.affine))
        sl += list(x[1:3])
        lb += list(y[1:3])
    mixed = [sl[0], sl[2], sl[1], sl[3]]  # interleave the two sizes
    mixed_lb = [lb[0], lb[2], lb[1], lb[3]]
    ad = LiteMedSamAdapter(LiteMedSAM.random(seed=0))
    ts = build_training_set(ad, mixed, mixed_lb, [1, 2])
    for j, i in enumerate([0, 2, 1, 3]):
        one = build_training_set(ad, [sl[i]], [lb[i]], [1, 2])
        assert torch.equal(ts.grid_masks[j], one.grid_masks[0]) and torch.equal(ts.targets[j], one.targets[0])
        assert torch.allclose(ts.feats["embed"][j], one.feats["embed"][0])
    with pytest.raises(Exception, match="same shape"):
        build_training_set(ad, [sl[0]], [lb[2]], [1])


ACDC = "acdc-sample"
POOL = ["patient001", "patient021", "patient041", "patient044"]  # 216x256, 240x256, 154x224, 256x216
QUERY = "patient022"  # 200x256
CLASSES = {"rv": 1, "myo": 2, "lv": 3}


@pytest.mark.slow
@pytest.mark.server
@needs(shared_missing(*[f"{ACDC}/{p}_frame01{s}.nii.gz" for p in POOL + [QUERY] for s in ("", "_gt")]))
def test_acdc_index_four_patients_infer_a_fifth_through_the_server(tmp_path):
    # 5 slices of each heart (every class, each patient's own in-plane size and affine): each slice
    # is a real LiteMedSAM encode, and CI time is tight
    src = acdc_slab(tmp_path / "slabs", [f"{p}_frame01" for p in POOL + [QUERY]], z=slice(1, 6))
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for p in POOL + [QUERY]:
        shutil.copy(src / f"{p}_frame01.nii.gz", studies / f"{p}.nii.gz")
    for p in POOL:
        shutil.copy(src / f"{p}_frame01_gt.nii.gz", studies / "labels" / "final" / f"{p}.nii.gz")
    conf = {"labels": ",".join(f"{k}={v}" for k, v in CLASSES.items()), "modality": "MR", "k": "3",
            "reconcile_interval": "1", "embed_unlabeled": "false"}
    srv = Server(studies, tmp_path / "server.log", conf,
                 env={"RAGSEG_WEIGHTS_DIR": str(tmp_path / "no-weights"), "RAGSEG_CACHE_DIR": str(tmp_path / "cache")})
    srv.start()
    try:
        # the 4th image is in the index a moment before its job is marked done: wait for both
        st = srv.wait_for(lambda i: i["ragseg"]["usable"] and i["ragseg"].get("index", {}).get("images") == 4
                          and not i["ragseg"]["reindex"]["pending"]
                          and not any(j["state"] == "running" for j in i["ragseg"]["reindex"]["recent_jobs"]),
                          timeout=600)["ragseg"]
        assert st["reindex"]["last_error"] is None and all(j["state"] == "done" for j in st["reindex"]["recent_jobs"])
        status, body, _ = srv.request("POST", f"/infer/ragseg?image={QUERY}&output=all",
                                      fields={"params": json.dumps({"k": 3})}, timeout=900)
        assert status == 200, body[:1000]
    finally:
        srv.stop()
    # multipart: JSON params + the label file
    boundary = body.split(b"\r\n", 1)[0]
    parts = [p for p in body.split(boundary) if b"\r\n\r\n" in p]
    res = json.loads(next(p for p in parts if b"application/json" in p.split(b"\r\n\r\n", 1)[0]).split(b"\r\n\r\n", 1)[1].strip())
    img_part = next(p for p in parts if b"application/json" not in p.split(b"\r\n\r\n", 1)[0])
    out = tmp_path / "answer.nii.gz"
    out.write_bytes(img_part.split(b"\r\n\r\n", 1)[1].rstrip(b"\r\n-"))
    assert sorted(res["segmented_labels"]) == sorted(CLASSES) and res["missing_labels"] == []
    # RV, MYO and LV are one connected structure in each labeled heart: one component each
    assert sorted(res["largest_component_only"]) == sorted(CLASSES), res
    # the pool's hearts show the LV inside the myocardium's ring, and nothing else enclosed
    assert res["enclosed"] == [["lv", "myo"]], res
    assert {sid for sups in res["supports"].values() for sid, _ in sups} <= set(POOL)
    pred, query = nib.load(out), nib.load(src / f"{QUERY}_frame01.nii.gz")
    assert pred.shape == query.shape and np.allclose(pred.affine, query.affine, atol=1e-4)
    gt = np.asarray(nib.load(src / f"{QUERY}_frame01_gt.nii.gz").dataobj)
    p = np.asarray(pred.dataobj)
    dice = {k: float(2 * ((p == v) & (gt == v)).sum() / max(1, (p == v).sum() + (gt == v).sum()))
            for k, v in CLASSES.items()}
    heart = float(2 * ((p > 0) & (gt > 0)).sum() / max(1, (p > 0).sum() + (gt > 0).sum()))
    for v in CLASSES.values():  # no stray island: every piece left is at least half the largest's size
        lab, n = ndimage.label(p == v, structure=ndimage.generate_binary_structure(3, 1))
        sizes = np.bincount(lab.ravel())[1:]
        assert n >= 1 and sizes.min() >= 0.5 * sizes.max(), (v, sizes)
    print("ACDC cross-patient Dice through the server (4 labeled patients, training-free LiteMedSAM, k=3):", dice,
          "heart (any label):", round(heart, 3))
    # Measured on these slabs (2026-11-30): heart 0.70, RV 0.78, MYO 0.38, LV 0.88. The bounds check
    # that the heart and its chambers are found on a patient of another size, with a wide margin.
    assert heart > 0.55 and np.mean(list(dice.values())) > 0.5, (heart, dice)
