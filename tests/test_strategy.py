"""Diversity active learning on a real MONAI Label LocalDatastore (random-weight embedder)."""

from __future__ import annotations

import numpy as np

from ragseg.embedders import DinoV2Embedder, l2_normalize
from ragseg.label_app.components import Components
from ragseg.label_app.config import AppConfig
from ragseg.label_app.strategy import DiversityStrategy
from ragseg.pipeline import Preprocess, discover_pairs, sync_index
from ragseg.synthetic import make_dataset
from ragseg.volume import load_image

SHAPE = (32, 30, 10)


def _setup(tmp_path, n_labeled):
    from monailabel.datastore.local import LocalDatastore

    make_dataset(tmp_path / "ds", n_subjects=5, n_labeled=n_labeled, shape=SHAPE)
    ds = LocalDatastore(str(tmp_path / "ds"), extensions=["*.nii.gz"], auto_reload=False)
    comps = Components(AppConfig.from_conf({"random_weights_for_testing": "true"}), tmp_path / "idx")
    return ds, comps


def _embed_all(ids, root):
    emb = DinoV2Embedder.random(seed=0, image_size=112)
    return {i: emb.embed(Preprocess().slices(load_image(root / f"{i}.nii.gz"))) for i in ids}


def test_cold_start_picks_the_most_representative_image(tmp_path):
    ds, comps = _setup(tmp_path, n_labeled=0)
    res = DiversityStrategy(comps)({"strategy": "diversity"}, ds)
    vecs = _embed_all(sorted(ds.list_images()), tmp_path / "ds")
    ids = sorted(vecs)
    means = l2_normalize(np.stack([vecs[i].mean(0) for i in ids]))
    center = l2_normalize(means.mean(0, keepdims=True))[0]
    assert res["cold_start"] is True and res["id"] == ids[int(np.argmax(means @ center))]
    assert ds.get_image_info(res["id"])["ragseg_suggestion"]["id"] == res["id"]


def test_farthest_image_and_slices(tmp_path):
    ds, comps = _setup(tmp_path, n_labeled=2)
    sync_index(comps.index(), comps.embedder(), comps.pre,
               discover_pairs(tmp_path / "ds", tmp_path / "ds" / "labels" / "final"))
    res = DiversityStrategy(comps)({"strategy": "diversity"}, ds)
    unlabeled = sorted(ds.get_unlabeled_images())
    assert res["id"] in unlabeled and res["cold_start"] is False
    pool = comps.index().vectors()
    vecs = _embed_all(unlabeled, tmp_path / "ds")
    best = max(((1 - (v @ pool.T).max(1)).max(), i) for i, v in vecs.items())
    assert res["id"] == best[1]
    assert len(res["slices"]) == 3 and len(set(res["slices"])) == 3
    all_sims = np.concatenate([(v @ pool.T).max(1) for v in vecs.values()])
    assert abs(res["coverage"] - float(all_sims.mean())) < 1e-5
    # when everything is labeled there is nothing to suggest
    for i in unlabeled:
        ds.save_label(i, str(tmp_path / "ds" / "labels" / "final" / "subject_00.nii.gz"), "final", {})
    assert DiversityStrategy(comps)({"strategy": "diversity"}, ds) is None
