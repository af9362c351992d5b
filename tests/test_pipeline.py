"""The whole path on generated data: volume -> embeddings -> index -> retrieval -> engine -> label file.

SAM 2.1 hiera-t and DINOv2 have random weights here, so the masks carry no meaning; what is
checked is the plumbing: which slices are indexed, which supports are used, shapes, geometry,
caching and index/label consistency.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from ragseg import layout
from ragseg.engine import RagSam2Engine, SupportMemoryCache
from ragseg.pipeline import Preprocess, Segmenter, discover_pairs, open_index, sync_index
from ragseg.synthetic import make_dataset, make_subject, write_subject
from ragseg.volume import load_image, load_label, save_label

SHAPE = (40, 36, 12)


@pytest.fixture()
def dataset(tmp_path):
    make_dataset(tmp_path / "ds", n_subjects=4, n_labeled=2, shape=SHAPE)
    return tmp_path / "ds"


def _labeled_slices(label_path):
    lab = nib.load(label_path).get_fdata()
    return {int(z) for z in np.nonzero(lab.any(axis=(0, 1)))[0]}


def test_sync_index_tracks_labels(tmp_path, dataset, dino_embedder):
    pre = Preprocess()
    labels = dataset / "labels" / "final"
    idx = open_index(tmp_path / "idx", dino_embedder, pre)
    rep = sync_index(idx, dino_embedder, pre, discover_pairs(dataset, labels))
    assert sorted(rep.added) == ["subject_00", "subject_01"]
    for sid in ("subject_00", "subject_01"):  # exactly the slices that carry a label
        got = {r.slice_index for r in idx.records() if r.image_id == sid}
        assert got == _labeled_slices(labels / f"{sid}.nii.gz")
    rec = next(r for r in idx.records() if r.image_id == "subject_00")
    lab_sl = np.moveaxis(nib.load(labels / "subject_00.nii.gz").get_fdata(), 2, 0)[rec.slice_index]
    assert rec.labels == sorted(int(v) for v in np.unique(lab_sl) if v > 0)

    assert sync_index(idx, dino_embedder, pre, discover_pairs(dataset, labels)).unchanged == ["subject_00", "subject_01"]
    # a volume indexed before the label-layout evidence existed is re-indexed once, then left alone
    from ragseg import layout
    from ragseg.index import SliceRecord

    old = [r for r in idx.records() if r.image_id == "subject_01"]
    vec = idx.vectors()[[i for i, r in enumerate(idx.records()) if r.image_id == "subject_01"]]
    idx.replace_image("subject_01", vec, [SliceRecord(r.image_id, r.slice_index, r.labels, r.label_checksum,
                                                      r.image_checksum, r.image_path, r.label_path,
                                                      {"preprocess": pre.id}) for r in old])
    rep = sync_index(idx, dino_embedder, pre, discover_pairs(dataset, labels))
    assert rep.updated == ["subject_01"] and rep.unchanged == ["subject_00"]
    assert all(layout.has_evidence(r.extra) for r in idx.records())
    assert sync_index(idx, dino_embedder, pre, discover_pairs(dataset, labels)).unchanged == ["subject_00", "subject_01"]

    # re-save subject_00 with fewer labeled slices: its stale vectors are replaced
    img = load_image(dataset / "subject_00.nii.gz")
    lab = load_label(labels / "subject_00.nii.gz", like=img)
    arr = lab.array.copy()
    arr[..., : SHAPE[2] // 2] = 0
    save_label(labels / "subject_00.nii.gz", arr, img)
    rep = sync_index(idx, dino_embedder, pre, discover_pairs(dataset, labels))
    assert rep.updated == ["subject_00"]
    assert {r.slice_index for r in idx.records() if r.image_id == "subject_00"} == _labeled_slices(
        labels / "subject_00.nii.gz")

    # a deleted label removes its slices; a newly labeled image appears
    os.remove(labels / "subject_01.nii.gz")
    s = make_subject(2, shape=SHAPE)
    nib.save(nib.Nifti1Image(s.label, s.affine), labels / "subject_02.nii.gz")
    rep = sync_index(idx, dino_embedder, pre, discover_pairs(dataset, labels))
    assert rep.removed == ["subject_01"] and rep.added == ["subject_02"]
    assert set(idx.images()) == {"subject_00", "subject_02"}


def test_rebuild_after_embedder_change(tmp_path, dataset, dino_embedder):
    from ragseg.embedders import DinoV2Embedder

    pre = Preprocess()
    items = discover_pairs(dataset, dataset / "labels" / "final")
    idx = open_index(tmp_path / "idx", dino_embedder, pre)
    sync_index(idx, dino_embedder, pre, items)
    n = len(idx)
    other = DinoV2Embedder.random(seed=1, image_size=56, pooling="mean")
    idx2 = open_index(tmp_path / "idx", other, pre)
    assert idx2.stale_reason and len(idx2) == 0
    sync_index(idx2, other, pre, items)
    assert len(idx2) == n and idx2.stale_reason is None


def _segmenter(tmp_path, sam2_model, emb, dataset, **kw):
    pre = Preprocess()
    idx = open_index(tmp_path / "idx", emb, pre)
    sync_index(idx, emb, pre, discover_pairs(dataset, dataset / "labels" / "final"))
    eng = RagSam2Engine(sam2_model, model_id="t", cache=SupportMemoryCache(tmp_path / "mem"))
    return Segmenter(eng, emb, idx, pre, **kw)


@pytest.mark.slow
def test_segment_volume_end_to_end(tmp_path, dataset, sam2_model, dino_embedder):
    seg = _segmenter(tmp_path, sam2_model, dino_embedder, dataset, k=2)
    # a query stored in another orientation (PSR) with anisotropic voxels
    s = make_subject(9, shape=SHAPE, spacing=(1.2, 0.9, 2.5), orientation="PSR")
    write_subject(s, tmp_path / "q.nii.gz")
    res = seg.segment_volume(tmp_path / "q.nii.gz", image_id="q", labels=[1, 2, 3, 7], return_probabilities=True)
    img = load_image(tmp_path / "q.nii.gz")
    assert res.label_map.shape == img.shape
    assert res.missing_labels == [7]
    assert set(np.unique(res.label_map)) <= {0, 1, 2, 3}
    assert set(res.supports) == {1, 2, 3} and all(len(v) == 2 for v in res.supports.values())
    assert set(res.probabilities) == {1, 2, 3} and res.probabilities[1].shape == img.shape
    # labels agree with probabilities: a voxel labeled v has p_v >= 0.5
    lm = res.label_map
    for v in (1, 2, 3):
        if (lm == v).any():
            assert (res.probabilities[v][lm == v] >= 0.5).all()  # float16 probabilities
    out = save_label(tmp_path / "q_seg.nii.gz", lm, img)
    back = nib.load(out)
    assert back.shape == img.shape and np.allclose(back.affine, img.affine)
    # second run reads every support memory from cache
    misses = seg.engine.cache.misses
    seg.segment_volume(tmp_path / "q.nii.gz", image_id="q", labels=[1])
    assert seg.engine.cache.misses == misses


@pytest.mark.slow
def test_one_structure_labels_keep_their_largest_component(tmp_path, dataset, sam2_model, dino_embedder):
    """The index records each labeled volume's 3D layout; the Segmenter reads it back and reduces the
    labels that are one structure in every labeled volume (synthetic liver 1, spleen 2; not the
    two-kidney label 3) to their largest component, over the volume's consecutive slices only."""
    seg = _segmenter(tmp_path, sam2_model, dino_embedder, dataset, k=2)
    recs = seg.index.records()
    assert all(layout.RECORD_KEY in r.extra for r in recs)
    assert layout.single_structure_labels(recs) == {1, 2}
    s = make_subject(9, shape=SHAPE)
    write_subject(s, tmp_path / "q.nii.gz")
    all_slices = seg.pre.slices(load_image(tmp_path / "q.nii.gz"))
    res = seg.segment_slices(all_slices, image_id="q", labels=[1, 2, 3])
    assert res.single_structures == [1, 2]
    raw = Segmenter(seg.engine, seg.embedder, seg.index, seg.pre, k=2, keep_largest=False).segment_slices(
        all_slices, image_id="q", labels=[1, 2, 3])
    assert raw.single_structures == []
    assert np.array_equal(res.labels, layout.keep_largest(raw.labels, [1, 2]))
    # scattered slices are not a volume: no 3D rule
    part = seg.segment_slices(all_slices, image_id="q", labels=[1, 2], slices=[2, 5])
    assert part.single_structures == []


@pytest.mark.slow
def test_query_slice_is_never_its_own_support(tmp_path, dataset, sam2_model, dino_embedder):
    seg = _segmenter(tmp_path, sam2_model, dino_embedder, dataset, k=3, allow_same_image=True)
    labeled = sorted(_labeled_slices(dataset / "labels" / "final" / "subject_00.nii.gz"))
    z = labeled[len(labeled) // 2]
    res = seg.segment_volume(dataset / "subject_00.nii.gz", image_id="subject_00", labels=[1], slices=[z])
    assert ("subject_00", z) not in res.supports[1]
    assert any(i == "subject_00" for i, _ in res.supports[1])  # intra-volume supports allowed
    seg2 = _segmenter(tmp_path / "b", sam2_model, dino_embedder, dataset, k=3, allow_same_image=False)
    res2 = seg2.segment_volume(dataset / "subject_00.nii.gz", image_id="subject_00", labels=[1], slices=[z])
    assert all(i != "subject_00" for i, _ in res2.supports[1])
    # only the requested slice is written
    assert set(np.nonzero(res.label_map.any(axis=(0, 1)))[0]) <= {z}


@pytest.mark.slow
def test_propagate_mode(tmp_path, dataset, sam2_model, dino_embedder):
    seg = _segmenter(tmp_path, sam2_model, dino_embedder, dataset, k=2, propagate=True)
    res = seg.segment_volume(dataset / "subject_03.nii.gz", image_id="subject_03", labels=[1, 3], slices=range(3, 9))
    assert res.label_map.shape == SHAPE and res.slices == list(range(3, 9))
    # one support set for the whole range in this mode
    assert len(res.supports[1]) == 2


@pytest.mark.slow
def test_cli_segment_writes_label(tmp_path, dataset):
    env = dict(os.environ, RAGSEG_CACHE_DIR=str(tmp_path / "cache"))
    out = tmp_path / "seg.nrrd"
    cmd = [sys.executable, "-m", "ragseg.cli", "segment", str(dataset / "subject_03.nii.gz"), "--supports",
           str(dataset), "-o", str(out), "-k", "2", "--image-size", "128", "--random-weights-for-testing"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "RANDOM weights" in p.stderr  # never silent
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["output"] == str(out)
    img = load_image(dataset / "subject_03.nii.gz")
    lab = load_label(out, like=img)  # same grid, as NRRD
    assert lab.shape == img.shape


def test_cli_errors_are_one_line(tmp_path, dataset):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "ragseg.cli", *args], capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, RAGSEG_WEIGHTS_DIR=str(tmp_path / "w")))

    p = run("segment", str(tmp_path / "nope.nii.gz"), "--supports", str(dataset))
    assert p.returncode == 2 and "nope.nii.gz: file does not exist" in p.stderr and "Traceback" not in p.stderr
    # rag-sam2 without weights: the message names the file and the fetch command, nothing falls back
    # (with the default `--backend auto` it would segment with LiteMedSAM instead)
    p = run("segment", str(dataset / "subject_03.nii.gz"), "--supports", str(dataset), "--backend", "rag-sam2",
            "--retrieval", "dinov2")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "ragseg weights fetch" in p.stderr and str(tmp_path / "w") in p.stderr
    empty = tmp_path / "empty"
    shutil.copytree(dataset, empty)
    shutil.rmtree(empty / "labels")
    p = run("segment", str(empty / "subject_03.nii.gz"), "--supports", str(empty), "--random-weights-for-testing")
    assert p.returncode == 2 and "labels/ folder" in p.stderr


@pytest.mark.slow
def test_label_all_local_resumes_and_never_touches_final(tmp_path, dataset):
    from ragseg.factory import ModelConfig
    from ragseg.label_all import label_local, local_segmenter_factory

    final_before = {p.name: p.read_bytes() for p in (dataset / "labels" / "final").iterdir()}
    cfg = ModelConfig(random_weights=True, image_size=128)
    factory = local_segmenter_factory(dataset, cfg, Preprocess(), 2)
    rep = label_local(dataset, factory, limit=1, progress=False)  # "interrupted" after one image
    assert rep.done == ["subject_02"] and sorted(rep.human) == ["subject_00", "subject_01"]
    mtime = (dataset / "labels" / "original" / "subject_02.nii.gz").stat().st_mtime_ns
    rep = label_local(dataset, factory, progress=False)
    assert rep.done == ["subject_03"] and rep.skipped == ["subject_02"]
    assert (dataset / "labels" / "original" / "subject_02.nii.gz").stat().st_mtime_ns == mtime
    out = load_label(dataset / "labels" / "original" / "subject_03.nii.gz",
                     like=load_image(dataset / "subject_03.nii.gz"))
    assert out.shape == SHAPE
    assert {p.name: p.read_bytes() for p in (dataset / "labels" / "final").iterdir()} == final_before


def test_label_rule_keeps_an_enclosed_structure_inside_a_filled_ring():
    """A box-prompted ring (myocardium) comes out as a disk over its cavity: where the pool shows
    the pair enclosed, the enclosed structure wins the overlap, so the ring stays a ring; other
    pairs and structures side by side keep the argmax."""
    import torch

    from ragseg.pipeline import logits_to_labels

    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 32, xx - 32)
    disk_out, disk_in = r < 20, r < 12
    lg = torch.full((1, 3, 64, 64), -5.0)
    lg[0, 0][torch.from_numpy(disk_out)] = 6.0  # "MYO" decoded as a filled disk, confident everywhere
    lg[0, 1][torch.from_numpy(disk_in)] = 3.0  # "LV", less confident than the disk
    lg[0, 2][torch.from_numpy((xx > 54) & (yy < 10))] = 2.0  # a separate structure
    lg[0, 2][torch.from_numpy(disk_out & (xx > 48))] = 1.0  # overlapping the disk's edge, not enclosed
    plain = logits_to_labels(lg, [2, 3, 1])
    assert not (plain == 3).any()  # the argmax alone loses the cavity entirely
    # a pair the pool does not show enclosed (here: 3 inside 1) changes nothing
    assert np.array_equal(logits_to_labels(lg, [2, 3, 1], nested=[(3, 1), (7, 2)]), plain)
    lab = logits_to_labels(lg, [2, 3, 1], nested=[(3, 2)])
    assert ((lab == 3) == disk_in).all()
    assert ((lab == 2) == (disk_out & ~disk_in)).all()  # a ring: the part of the edge the third one lost is kept
    assert ((lab == 1) == ((xx > 54) & (yy < 10))).all()


def test_diverse_supports_spread_over_labeled_images():
    from types import SimpleNamespace

    from ragseg.pipeline import diverse_top_k

    def hit(img, z):
        return SimpleNamespace(record=SimpleNamespace(image_id=img, slice_index=z))

    hits = [hit("a", 1), hit("a", 2), hit("a", 3), hit("b", 1), hit("c", 4), hit("b", 2)]
    got = [(h.record.image_id, h.record.slice_index) for h in diverse_top_k(hits, 3)]
    assert got == [("a", 1), ("b", 1), ("c", 4)]  # best first, one per image
    got = [(h.record.image_id, h.record.slice_index) for h in diverse_top_k(hits, 5)]
    assert got == [("a", 1), ("a", 2), ("b", 1), ("c", 4), ("b", 2)]  # at most ceil(5/3) = 2 per image
    one = [hit("ct", z) for z in (5, 9, 2, 7)]  # one labeled image (intra-volume): plain top-k
    assert [h.record.slice_index for h in diverse_top_k(one, 3)] == [5, 9, 2]


def test_frozen_support_store_needs_no_files(tmp_path):
    """What Ray workers get: every support slice in memory, identical to reading the files."""
    import pickle
    import shutil

    from ragseg.pipeline import Preprocess, SupportStore, discover_pairs, embed_labeled_volume
    from ragseg.synthetic import make_dataset

    make_dataset(tmp_path / "ds", n_subjects=2, n_labeled=2, shape=(32, 30, 8))
    pre = Preprocess()

    class Emb:
        id, dim = "zeros", 2

        def embed(self, x):
            return np.zeros((len(x), 2), np.float32)

    recs = [r for it in discover_pairs(tmp_path / "ds", tmp_path / "ds" / "labels" / "final")
            for r in embed_labeled_volume(it, Emb(), pre)[1]]
    store = SupportStore(pre)
    want = {(r.image_id, r.slice_index, v): store.support(r, v).load() for r in recs for v in r.labels}
    frozen = pickle.loads(pickle.dumps(store.freeze(recs)))
    shutil.rmtree(tmp_path / "ds")
    for r in recs:
        for v in r.labels:
            img, mask = frozen.support(r, v).load()
            w_img, w_mask = want[(r.image_id, r.slice_index, v)]
            assert np.array_equal(img, w_img) and np.array_equal(mask, w_mask) and mask.any()
            assert frozen.support(r, v).key == store.support(r, v).key
