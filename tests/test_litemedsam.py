"""LiteMedSAM with its real shipped weights (the offline model for #4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from .integration import needs, shared_missing

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalseg-examples"


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    import os

    os.environ.setdefault("RAGSEG_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    from ragseg.litemedsam import LiteMedSAM

    return LiteMedSAM()


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


@pytest.mark.slow
@needs(shared_missing("totalseg-examples/ct.nii.gz"))
def test_ground_truth_box_prompt_segments_liver(lite):
    """Dice of a ground-truth-box prompt on real CT liver slices (TotalSegmentator class 5) > 0.7."""
    from ragseg.litemedsam import bounding_box
    from ragseg.pipeline import Preprocess
    from ragseg.volume import load_image, load_label

    img = load_image(SHARED / "ct.nii.gz")
    lab = load_label(SHARED / "ct_labels.nii.gz", like=img)
    pre = Preprocess(modality="CT", ct_window="abdomen")
    sl, ls = pre.slices(img), pre.label_slices(lab) == 5
    area = ls.sum(axis=(1, 2))
    zs = np.argsort(area)[-3:]  # the three slices with the most liver
    pred = lite.segment_boxes(sl[zs], [bounding_box(ls[z]) for z in zs])
    dice = [_dice(pred[i], ls[z]) for i, z in enumerate(zs)]
    print("liver box-prompt Dice per slice:", [round(d, 3) for d in dice])
    assert np.mean(dice) > 0.7, dice


@pytest.mark.slow
def test_channels_last_and_batching_agree(lite, rng):
    import copy

    import torch

    from ragseg.litemedsam import LiteMedSAM

    x = rng.random((2, 80, 96)).astype(np.float32)
    a = lite.encode(x)  # channels-last, batch 1
    plain = copy.deepcopy(lite.net)
    plain.image_encoder.to(memory_format=torch.contiguous_format)
    b = LiteMedSAM(plain, channels_last=False).encode(x, batch=2)
    assert a.shape == (2, 256, 64, 64)
    assert (a - b).abs().max().item() < 1e-4


@pytest.mark.slow
@needs(shared_missing("totalseg-examples/ct.nii.gz"))
def test_prototype_prompt_intra_volume(lite):
    """Training-free mode: 3 labeled slices per organ -> prototype box prompt on other slices of the same CT."""
    import torch

    from ragseg.pipeline import Preprocess
    from ragseg.prototypes import prototype_box
    from ragseg.volume import load_image, load_label

    img = load_image(SHARED / "ct.nii.gz")
    lab = load_label(SHARED / "ct_labels.nii.gz", like=img)
    pre = Preprocess(modality="CT", ct_window="abdomen")
    sl, labs = pre.slices(img), pre.label_slices(lab)
    plan = {}
    for cls in (5, 1, 2):  # liver, spleen, right kidney (TotalSegmentator v2 ids)
        zs = np.nonzero((labs == cls).any((1, 2)))[0]
        sup = zs[np.linspace(0, len(zs) - 1, 3).round().astype(int)]
        plan[cls] = (list(sup), [z for z in zs if z not in sup][::4])
    needed = sorted({z for s, q in plan.values() for z in s + q})
    emb = dict(zip(needed, lite.encode(sl[needed])))
    means = {}
    for cls, (sup, queries) in plan.items():
        m = labs == cls
        se = torch.stack([emb[z] for z in sup])
        dice = []
        for z in queries:
            r = prototype_box(emb[z], se, torch.from_numpy(m[sup]))
            pred = np.zeros(m.shape[1:], bool) if r is None else (torch.nn.functional.interpolate(
                lite.decode_boxes(emb[z][None], r[0][None]), size=m.shape[1:], mode="bilinear")[0, 0] > 0).numpy()
            dice.append(_dice(pred, m[z]))
        means[cls] = float(np.mean(dice))
    print("prototype-prompt mean Dice (liver, spleen, right kidney):", means)
    assert means[5] > 0.75 and means[1] > 0.75 and means[2] > 0.5, means


@pytest.mark.slow
def test_litemedsam_backend_through_the_pipeline(lite, tmp_path):
    """Index (LiteMedSAM retrieval embedding) -> Segmenter -> LiteMedSamEngine; disk-cached supports reused."""
    from ragseg.engine import SupportMemoryCache
    from ragseg.litemedsam import LiteMedSamEmbedder, LiteMedSamEngine, SupportEmbedding
    from ragseg.pipeline import Preprocess, Segmenter, discover_pairs, open_index, sync_index
    from ragseg.synthetic import make_dataset, make_subject

    root = tmp_path / "ds"
    make_dataset(root, n_subjects=3, n_labeled=2, shape=(64, 64, 10), seed=5)
    pre = Preprocess(modality="CT")
    emb = LiteMedSamEmbedder(lite)
    idx = open_index(tmp_path / "index", emb, pre)
    sync_index(idx, emb, pre, discover_pairs(root, root / "labels" / "final"))
    assert len(idx) > 0 and emb.dim == 4096
    cache_dir = tmp_path / "supports"
    eng = LiteMedSamEngine(lite, cache=SupportMemoryCache(cache_dir, item_type=SupportEmbedding))
    res = Segmenter(eng, emb, idx, pre, k=2).segment_volume(root / "subject_02.nii.gz")
    gt = make_subject(7, shape=(64, 64, 10)).label
    d = {v: _dice(res.label_map == v, gt == v) for v in (1, 2)}
    print("LiteMedSAM backend via Segmenter, Dice liver/spleen:", d, res.timings)
    assert d[1] > 0.6 and (res.label_map == 2).any()  # small synthetic spleen: 0.24 measured
    assert res.timings["encode"] > 0 and res.timings["decode"] > 0 and eng.cache.misses > 0
    # a new engine (as after a restart) reads the supports from disk and gives the same labels
    eng2 = LiteMedSamEngine(lite, cache=SupportMemoryCache(cache_dir, item_type=SupportEmbedding))
    res2 = Segmenter(eng2, emb, idx, pre, k=2).segment_volume(root / "subject_02.nii.gz")
    assert eng2.cache.hits > 0 and eng2.cache.misses == 0
    assert np.array_equal(res.label_map, res2.label_map)


def test_discover_pairs_by_suffix(tmp_path):
    from ragseg.pipeline import discover_pairs

    for n in ("p1_flair", "p1_lesions", "p2_flair", "p3_lesions", "ct", "ct_labels"):
        (tmp_path / f"{n}.nii.gz").write_bytes(b"")
    got = discover_pairs(tmp_path, image_suffix="_flair", label_suffix="_lesions")
    assert [(g.image_id, Path(g.image_path).name, Path(g.label_path).name) for g in got] == [
        ("p1", "p1_flair.nii.gz", "p1_lesions.nii.gz")]
    got = discover_pairs(tmp_path, label_suffix="_labels")
    assert [(g.image_id, Path(g.label_path).name) for g in got] == [("ct", "ct_labels.nii.gz")]
