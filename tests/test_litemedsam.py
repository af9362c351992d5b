"""LiteMedSAM with its real shipped weights (the offline model for #4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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
@pytest.mark.skipif(not (SHARED / "ct.nii.gz").exists(), reason="../shared/data/totalseg-examples is absent")
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
@pytest.mark.skipif(not (SHARED / "ct.nii.gz").exists(), reason="../shared/data/totalseg-examples is absent")
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
