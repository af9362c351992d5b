"""Diversity active learning on a real MONAI Label LocalDatastore (random-weight embedder)."""

from __future__ import annotations

import numpy as np

from ragseg.embedders import DinoV2Embedder, l2_normalize
from ragseg.label_app.components import Components
from ragseg.label_app.config import AppConfig
from ragseg.label_app.strategy import DiversityStrategy, EmbeddingWarmer, SliceEmbeddingCache
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


def _strategy(comps, ds):
    """The strategy and its background warmer (not started: the test drives it)."""
    cache = SliceEmbeddingCache(comps)
    warmer = EmbeddingWarmer(comps, ds, cache)
    return DiversityStrategy(comps, cache, warmer), warmer


def test_answers_from_cache_only_and_says_when_partial(tmp_path):
    """No embedding on the request: before the warmer ran the answer is partial and instant."""
    ds, comps = _setup(tmp_path, n_labeled=2)
    comps.embedder()
    strat, warmer = _strategy(comps, ds)
    res = strat({"strategy": "diversity"}, ds)
    unlabeled = sorted(ds.get_unlabeled_images())
    assert res["partial"] is True and res["embedded_images"] == 0 and res["unlabeled_images"] == len(unlabeled)
    assert res["id"] in unlabeled and "being embedded" in res["message"]
    assert not (comps.index_dir / "embeddings").exists()  # the request embedded nothing
    # the warmer embeds one image at a time; a suggestion made halfway covers what is cached
    path = ds.get_image_uri(unlabeled[-1])
    warmer.cache.get(path)
    res = strat({"strategy": "diversity"}, ds)
    assert res["partial"] is True and res["embedded_images"] == 1 and res["id"] == unlabeled[-1]
    assert warmer.warm() == len(unlabeled) - 1 and warmer.warm() == 0  # once per image
    res = strat({"strategy": "diversity"}, ds)
    assert res["partial"] is False and res["embedded_images"] == len(unlabeled) and "message" not in res


def test_cold_start_picks_the_most_representative_image(tmp_path):
    ds, comps = _setup(tmp_path, n_labeled=0)
    strat, warmer = _strategy(comps, ds)
    warmer.warm()
    res = strat({"strategy": "diversity"}, ds)
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
    strat, warmer = _strategy(comps, ds)
    warmer.warm()
    res = strat({"strategy": "diversity"}, ds)
    unlabeled = sorted(ds.get_unlabeled_images())
    assert res["id"] in unlabeled and res["cold_start"] is False and res["partial"] is False
    pool = comps.index().vectors()
    vecs = _embed_all(unlabeled, tmp_path / "ds")
    best = max(((1 - (v @ pool.T).max(1)).max(), i) for i, v in vecs.items())
    assert res["id"] == best[1]
    assert len(res["slices"]) == 3 and len(set(res["slices"])) == 3
    # the first suggested slice, in file numbering, is the farthest slice of that image
    v = vecs[res["id"]]
    far = int((1 - (v @ pool.T).max(1)).argmax())  # canonical = file order for these RAS volumes
    assert res["slices"][0] == far
    all_sims = np.concatenate([(v @ pool.T).max(1) for v in vecs.values()])
    assert abs(res["coverage"] - float(all_sims.mean())) < 1e-5
    # when everything is labeled there is nothing to suggest
    for i in unlabeled:
        ds.save_label(i, str(tmp_path / "ds" / "labels" / "final" / "subject_00.nii.gz"), "final", {})
    assert strat({"strategy": "diversity"}, ds) is None


def test_without_background_embedding_the_request_embeds(tmp_path):
    """--conf embed_unlabeled false: nothing runs in the background, so the strategy embeds itself."""
    ds, comps = _setup(tmp_path, n_labeled=2)
    strat, warmer = _strategy(comps, ds)
    warmer.enabled = False
    res = strat({"strategy": "diversity"}, ds)
    assert res["partial"] is False and res["embedded_images"] == len(ds.get_unlabeled_images())
