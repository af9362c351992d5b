"""The background re-indexer and label checksums (real LocalDatastore, random-weight DINOv2)."""

from __future__ import annotations

import os
import time

import numpy as np

from ragseg.label_app.components import Components
from ragseg.label_app.config import AppConfig
from ragseg.label_app.reindex import Reindexer
from ragseg.pipeline import LabeledVolume, Preprocess, discover_pairs, sync_index
from ragseg.synthetic import make_dataset
from ragseg.volume import file_checksum, load_label

SHAPE = (24, 22, 6)


def _components(tmp_path) -> Components:
    cfg = AppConfig.from_conf({"random_weights_for_testing": "true", "precompute_memories": "false",
                               "image_size": "128"})
    return Components(cfg, tmp_path / "idx")


def test_jobs_past_the_kept_limit_are_all_indexed(tmp_path):
    """More labels than max_jobs_kept at startup: no queued job is forgotten, each is indexed."""
    from monailabel.datastore.local import LocalDatastore

    make_dataset(tmp_path / "ds", n_subjects=8, n_labeled=8, shape=SHAPE)
    ds = LocalDatastore(str(tmp_path / "ds"), extensions=["*.nii.gz"], auto_reload=False)
    comps = _components(tmp_path)
    r = Reindexer(comps, ds, interval=3600, max_jobs_kept=3)
    ids = sorted(ds.get_labeled_images("final"))
    jobs = {i: r.submit(i, "PUT /datastore/label") for i in ids}
    assert all(r.job(j)["state"] == "queued" for j in jobs.values())  # none evicted while queued
    assert r.submit(ids[0], "again") == jobs[ids[0]]  # deduplicated while queued
    r.start()
    try:
        end = time.time() + 120
        while time.time() < end and (r.busy() or set(comps.index().images()) != set(ids)):
            time.sleep(0.1)
    finally:
        r.stop()
    assert set(comps.index().images()) == set(ids)
    kept = [j for j in jobs.values() if r.job(j) is not None]
    assert 1 <= len(kept) <= 3 and all(r.job(j)["state"] == "done" for j in kept)  # finished ones age out
    assert r.job(jobs[ids[-1]])["slices"] > 0


def test_label_replaced_while_being_indexed_is_reindexed(tmp_path, monkeypatch, dino_embedder):
    """A label replaced between its checksum and its parsing must not look up to date afterwards."""
    import ragseg.pipeline as pipeline

    make_dataset(tmp_path / "ds", n_subjects=1, n_labeled=1, shape=SHAPE)
    items = discover_pairs(tmp_path / "ds", tmp_path / "ds" / "labels" / "final")
    lab_path = items[0].label_path
    first = open(lab_path, "rb").read()
    # the replacement labels only slice 2
    arr = load_label(lab_path, like=pipeline.load_image(items[0].image_path))
    only2 = arr.array.copy()
    only2[..., [z for z in range(SHAPE[2]) if z != 2]] = 0
    replacement = tmp_path / "new.nii.gz"
    from ragseg.volume import save_label

    save_label(replacement, only2, arr)
    real = pipeline.load_label
    swapped = []

    def load_then_replace(path, *a, **kw):  # a save lands right after the indexer parsed the file
        out = real(path, *a, **kw)
        if not swapped:
            os.replace(replacement, path)
            swapped.append(True)
        return out

    monkeypatch.setattr(pipeline, "load_label", load_then_replace)
    from ragseg.pipeline import open_index

    pre = Preprocess()
    index = open_index(tmp_path / "idx", dino_embedder, pre)
    sync_index(index, dino_embedder, pre, items)
    stored = index.images()[items[0].image_id]["label_checksum"]
    import hashlib

    assert stored == hashlib.sha256(first).hexdigest()  # the checksum of what was parsed
    assert stored != file_checksum(lab_path)  # so the next reconcile sees a change ...
    monkeypatch.setattr(pipeline, "load_label", real)
    rep = sync_index(index, dino_embedder, pre, [LabeledVolume(items[0].image_id, items[0].image_path, lab_path)])
    assert rep.updated == [items[0].image_id]  # ... and re-indexes it
    assert {r.slice_index for r in index.records()} == {2}
    assert index.images()[items[0].image_id]["label_checksum"] == file_checksum(lab_path)
    assert np.isfinite(index.vectors()).all()
